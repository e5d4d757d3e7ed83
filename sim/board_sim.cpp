// The simulated board: the Verilated UARTAccelerator (module board_top) behind a pseudo-terminal.
//
// A host opens the pty's slave with pyserial as it would open a board's /dev/ttyUSBn. This
// program is the far end: it drives the host's bytes onto the board's `rx` pin as 8N1 frames of
// `divisor` cycles per bit, decodes the frames on `tx` (sampled at mid-bit) into bytes for the host,
// and answers a control channel (one JSON object per line on stdin -> one per line on stdout):
//
//   {"cmd": "stats"}                                 -> the counters
//   {"cmd": "inject", "kind": K, "at": N, "mask": M} -> {"ok": true}; K is drop_host, corrupt_host,
//                                                       drop_board, corrupt_board or deaf
//   {"cmd": "recover"}                               -> {"ok": true}: the board is heard again
//   {"cmd": "quit"}                                  -> {"ok": true}, then exit
//
// The first line on stdout is {"port": "/dev/pts/N", ...}. End of stdin exits too (the Python
// object that started the process is gone), and so does the death of the parent process.
//
// Byte numbers (`at`) count from 0 since the process started: host byte N is the N-th byte the
// host wrote, board byte N the N-th frame the board sent on `tx`.
//
// The host side of the line (the FTDI chip and the kernel) holds at most `host_buffer` response
// bytes the host has not read: the bytes waiting here plus those in the pty's input queue
// (FIONREAD on the slave). Bytes are passed on to the pty while its queue holds fewer than
// PTY_QUEUE_LOW, so the pty itself never holds much that this count misses; a board byte that
// finds the host side full is dropped and counted (host_overruns), as a real FTDI chip drops it.
//
// Clocking: see the module docstring of sim/board_sim.py (free-running while anything is in
// flight, then `idle_cycles` more -- or as long as the bridge's resync count is armed -- then
// blocked in poll() until the host or the control channel speaks).
//
// Compile-time options (set by sim/board_sim.py from the generated Verilog's port list):
// HAS_RESYNC (a `resync` output pulse), HAS_ARMED (an `armed` output), TRACE_FST / TRACE_VCD.

#include "Vboard_top.h"
#include "verilated.h"
#if defined(TRACE_FST)
#include "verilated_fst_c.h"
#elif defined(TRACE_VCD)
#include "verilated_vcd_c.h"
#endif

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <random>
#include <string>

#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

namespace {

// Host bytes taken from the pty while fewer than this many wait for the line (the rest wait in
// the kernel, and the host's write() blocks when that is full: the USB link's back-pressure).
constexpr size_t RX_QUEUE_LOW = 1024;
// Board bytes are written to the pty while its input queue holds fewer than this many.
constexpr int PTY_QUEUE_LOW = 1024;
// Cycles between two looks at the pty and the control channel while the board runs: a few byte
// times at the smallest divisor, with RX_QUEUE_LOW bytes queued the line never starves.
constexpr int SLICE_CYCLES = 256;
constexpr uint64_t NEVER = UINT64_MAX;

struct Fault {
    bool drop;
    uint8_t mask;
};

struct Options {
    int divisor = 4;
    uint64_t host_buffer = 4096;
    uint64_t idle_cycles = 4096;
    uint64_t seed = 0;
    std::string waves;
};

uint64_t parse_u64(const char* flag, const char* text) {
    char* end = nullptr;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 0);
    if (errno || end == text || *end) {
        fprintf(stderr, "board_sim: %s needs an unsigned integer, got '%s'\n", flag, text);
        exit(2);
    }
    return v;
}

Options parse_options(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (i + 1 >= argc) {
            fprintf(stderr, "board_sim: option %s needs a value\n", a.c_str());
            exit(2);
        }
        const char* v = argv[++i];
        if (a == "--divisor") o.divisor = static_cast<int>(parse_u64("--divisor", v));
        else if (a == "--host-buffer") o.host_buffer = parse_u64("--host-buffer", v);
        else if (a == "--idle-cycles") o.idle_cycles = parse_u64("--idle-cycles", v);
        else if (a == "--seed") o.seed = parse_u64("--seed", v);
        else if (a == "--waves") o.waves = v;
        else {
            fprintf(stderr, "board_sim: unknown option %s\n", a.c_str());
            exit(2);
        }
    }
    if (o.divisor < 4) {
        fprintf(stderr, "board_sim: --divisor %d must be >= 4\n", o.divisor);
        exit(2);
    }
    return o;
}

// -- the control channel: flat JSON objects of strings and integers -------------------------------

// The value of "key" in a flat JSON object, as text (quotes removed); "" when absent.
std::string json_field(const std::string& line, const char* key) {
    std::string pat = std::string("\"") + key + "\"";
    size_t p = line.find(pat);
    if (p == std::string::npos) return "";
    p = line.find(':', p + pat.size());
    if (p == std::string::npos) return "";
    ++p;
    while (p < line.size() && (line[p] == ' ' || line[p] == '\t')) ++p;
    if (p < line.size() && line[p] == '"') {
        size_t q = line.find('"', p + 1);
        return q == std::string::npos ? "" : line.substr(p + 1, q - p - 1);
    }
    size_t q = p;
    while (q < line.size() && line[q] != ',' && line[q] != '}' && line[q] != ' ') ++q;
    return line.substr(p, q - p);
}

double now_s() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

class Board {
  public:
    explicit Board(const Options& o) : opt_(o), rng_(o.seed) {
        if (!opt_.waves.empty()) ctx_.traceEverOn(true);  // before the model is built
        top_.reset(new Vboard_top(&ctx_));
#if defined(TRACE_FST) || defined(TRACE_VCD)
        if (!opt_.waves.empty()) {
#if defined(TRACE_FST)
            trace_.reset(new VerilatedFstC);
#else
            trace_.reset(new VerilatedVcdC);
#endif
            top_->trace(trace_.get(), 99);
            trace_->open(opt_.waves.c_str());
        }
#endif
        top_->rx = 1;
        top_->rst = 1;
        for (int i = 0; i < 4; ++i) cycle();
        top_->rst = 0;
        link_error_ = top_->link_error;
        started_ = now_s();
    }

    ~Board() {
#if defined(TRACE_FST) || defined(TRACE_VCD)
        if (trace_) trace_->close();
#endif
        top_->final();
    }

    void open_pty() {
        master_ = posix_openpt(O_RDWR | O_NOCTTY);
        if (master_ < 0 || grantpt(master_) || unlockpt(master_)) die("posix_openpt");
        const char* name = ptsname(master_);
        if (!name) die("ptsname");
        port_ = name;
        // Held open here: the master never sees a hang-up while the host reopens the port, and
        // FIONREAD on it counts what the host has not read.
        slave_ = open(name, O_RDWR | O_NOCTTY | O_NONBLOCK);
        if (slave_ < 0) die("open pty slave");
        termios t;
        if (tcgetattr(slave_, &t)) die("tcgetattr");
        cfmakeraw(&t);
        if (tcsetattr(slave_, TCSANOW, &t)) die("tcsetattr");
        int flags = fcntl(master_, F_GETFL);
        fcntl(master_, F_SETFL, flags | O_NONBLOCK);
    }

    const std::string& port() const { return port_; }

    // Runs until told to quit (or the control channel closes).
    void run() {
        char ready[256];
        snprintf(ready, sizeof ready,
                 "{\"port\": \"%s\", \"pid\": %d, \"divisor\": %d, \"idle_cycles\": %" PRIu64
                 ", \"host_buffer\": %" PRIu64 "}",
                 port_.c_str(), getpid(), opt_.divisor, opt_.idle_cycles, opt_.host_buffer);
        reply(ready);
        idle_left_ = opt_.idle_cycles;  // settle after reset (the scratchpads are cleared)
        while (!quit_) {
            if (idle_left_ > 0) {
                double t0 = now_s();
                for (int i = 0; i < SLICE_CYCLES && idle_left_ > 0; ++i) step();
                clock_seconds_ += now_s() - t0;
                service(0);
            } else {
                // Asleep: nothing moves on the board. Wake up for the host, the control channel,
                // or (every millisecond) to see whether the host read what waits for it.
                service(tx_queue_.empty() ? -1 : 1);
            }
        }
    }

  private:
    // -- the clock --------------------------------------------------------------------------------

    void cycle() {
        top_->clk = 0;
        top_->eval();
#if defined(TRACE_FST) || defined(TRACE_VCD)
        if (trace_) trace_->dump(2 * cycles_);
#endif
        top_->clk = 1;
        top_->eval();
#if defined(TRACE_FST) || defined(TRACE_VCD)
        if (trace_) trace_->dump(2 * cycles_ + 1);
#endif
        ++cycles_;
    }

    // One clock cycle of the board with the line models around it.
    void step() {
        top_->rx = drive_rx();
        cycle();
        sample_tx(top_->tx);
        if (top_->link_error && !link_error_) ++rx_overflow_;
        link_error_ = top_->link_error;
        // Busy but starved is waiting for the host, not working (see sim/board_sim.py).
        bool working = top_->busy && !top_->starved;
        bool active = rx_frame_ || !rx_queue_.empty() || tx_frame_ || !top_->tx || working;
#ifdef HAS_RESYNC
        if (top_->resync) ++resyncs_;
#endif
#ifdef HAS_ARMED
        active = active || top_->armed;
#endif
        if (active) idle_left_ = opt_.idle_cycles;
        else --idle_left_;
    }

    // The host's UART transmitter: frames back to back while bytes wait; the first frame after an
    // idle line starts at a random phase of the board's clock (the two clocks are unrelated).
    uint8_t drive_rx() {
        if (!rx_frame_) {
            if (rx_queue_.empty()) return 1;
            if (rx_delay_ < 0) rx_delay_ = rx_idle_ ? static_cast<int>(rng_() % opt_.divisor) : 0;
            if (rx_delay_ > 0) {
                --rx_delay_;
                return 1;
            }
            rx_delay_ = -1;
            uint64_t index = host_taken_++;
            uint8_t byte = rx_queue_.front();
            rx_queue_.pop_front();
            auto f = host_faults_.find(index);
            if (f != host_faults_.end()) {
                ++faults_applied_;
                bool drop = f->second.drop;
                byte ^= f->second.mask;
                host_faults_.erase(f);
                if (drop) {
                    rx_idle_ = false;
                    return 1;
                }
            }
            rx_bits_ = (1u << 9) | (static_cast<uint32_t>(byte) << 1);  // stop, data, start
            rx_frame_ = true;
            rx_bit_ = 0;
            rx_timer_ = opt_.divisor;
            ++line_bytes_;
        }
        uint8_t level = (rx_bits_ >> rx_bit_) & 1;
        if (--rx_timer_ == 0) {
            rx_timer_ = opt_.divisor;
            if (++rx_bit_ == 10) {
                rx_frame_ = false;
                rx_idle_ = rx_queue_.empty();
            }
        }
        return level;
    }

    // The host's UART receiver on `tx`: a falling edge starts a frame, every bit is sampled at its
    // middle (the board's transmitter runs on this clock, so the samples never move).
    void sample_tx(uint8_t tx) {
        if (!tx_frame_) {
            if (tx) return;
            tx_frame_ = true;
            tx_bit_ = -1;
            tx_timer_ = opt_.divisor / 2;
            return;
        }
        if (--tx_timer_ > 0) return;
        tx_timer_ = opt_.divisor;
        if (tx_bit_ < 0) {
            if (tx) tx_frame_ = false;  // a glitch, not a start bit
            else tx_bit_ = 0;
        } else if (tx_bit_ < 8) {
            tx_shift_ = static_cast<uint8_t>((tx_shift_ >> 1) | (tx << 7));
            ++tx_bit_;
        } else {
            tx_frame_ = false;
            if (tx) board_byte(tx_shift_);
            else ++tx_framing_errors_;
        }
    }

    // A byte the board sent: faults, deafness and the host side's capacity decide its fate.
    void board_byte(uint8_t byte) {
        uint64_t index = board_bytes_++;
        auto f = board_faults_.find(index);
        if (f != board_faults_.end()) {
            ++faults_applied_;
            bool drop = f->second.drop;
            byte ^= f->second.mask;
            board_faults_.erase(f);
            if (drop) return;
        }
        if (index >= deaf_at_) {
            ++deaf_dropped_;
            return;
        }
        if (tx_queue_.size() + pty_unread() >= opt_.host_buffer) {
            ++host_overruns_;
            return;
        }
        tx_queue_.push_back(byte);
    }

    uint64_t pty_unread() const {
        int n = 0;
        if (ioctl(slave_, FIONREAD, &n) != 0) return 0;
        return static_cast<uint64_t>(n);
    }

    // -- the pty and the control channel ----------------------------------------------------------

    void service(int timeout_ms) {
        pollfd fds[2] = {{STDIN_FILENO, POLLIN, 0}, {master_, 0, 0}};
        if (rx_queue_.size() < RX_QUEUE_LOW) fds[1].events = POLLIN;
        if (poll(fds, 2, timeout_ms) < 0 && errno != EINTR) die("poll");
        if (fds[1].revents & POLLIN) read_host();  // first: a command sees what the host sent
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) read_control();
        write_host();
    }

    void read_host() {
        uint8_t buf[4096];
        ssize_t n = read(master_, buf, sizeof buf);
        if (n <= 0) return;  // EAGAIN, or EIO while no one has the slave open (never: we do)
        rx_queue_.insert(rx_queue_.end(), buf, buf + n);
        host_bytes_ += static_cast<uint64_t>(n);
        if (idle_left_ == 0) idle_left_ = opt_.idle_cycles;
    }

    void write_host() {
        while (!tx_queue_.empty()) {
            uint64_t queued = pty_unread();
            if (queued >= PTY_QUEUE_LOW) return;
            uint8_t buf[512];
            size_t n = std::min(tx_queue_.size(), sizeof buf);
            n = std::min(n, static_cast<size_t>(PTY_QUEUE_LOW - queued));
            std::copy(tx_queue_.begin(), tx_queue_.begin() + n, buf);
            ssize_t w = write(master_, buf, n);
            if (w <= 0) return;
            tx_queue_.erase(tx_queue_.begin(), tx_queue_.begin() + w);
            host_delivered_ += static_cast<uint64_t>(w);
        }
    }

    void read_control() {
        char buf[4096];
        ssize_t n = read(STDIN_FILENO, buf, sizeof buf);
        if (n <= 0) {  // the Python side is gone
            quit_ = true;
            return;
        }
        control_.append(buf, static_cast<size_t>(n));
        size_t nl;
        while ((nl = control_.find('\n')) != std::string::npos) {
            std::string line = control_.substr(0, nl);
            control_.erase(0, nl + 1);
            command(line);
        }
    }

    void command(const std::string& line) {
        std::string cmd = json_field(line, "cmd");
        if (cmd == "stats") {
            reply(stats());
        } else if (cmd == "inject") {
            std::string kind = json_field(line, "kind");
            std::string at = json_field(line, "at");
            std::string mask = json_field(line, "mask");
            if (at.empty()) return error("inject needs \"at\"");
            uint64_t index = strtoull(at.c_str(), nullptr, 0);
            uint8_t m = static_cast<uint8_t>(mask.empty() ? 0 : strtoul(mask.c_str(), nullptr, 0));
            bool host = kind == "drop_host" || kind == "corrupt_host";
            uint64_t next = host ? host_taken_ : board_bytes_;
            if (kind != "deaf" && index < next)
                return error(std::string(host ? "host" : "board") + " byte " + at +
                             " has passed already (the next is " + std::to_string(next) + ")");
            if (kind == "drop_host") host_faults_[index] = {true, 0};
            else if (kind == "corrupt_host") host_faults_[index] = {false, m};
            else if (kind == "drop_board") board_faults_[index] = {true, 0};
            else if (kind == "corrupt_board") board_faults_[index] = {false, m};
            else if (kind == "deaf") deaf_at_ = index;
            else return error("unknown fault kind '" + kind + "'");
            reply("{\"ok\": true}");
        } else if (cmd == "recover") {
            deaf_at_ = NEVER;
            reply("{\"ok\": true}");
        } else if (cmd == "quit") {
            quit_ = true;
            reply("{\"ok\": true}");
        } else {
            error("unknown command '" + cmd + "'");
        }
    }

    std::string stats() const {
        char buf[1024];
        snprintf(buf, sizeof buf,
                 "{\"cycles\": %" PRIu64 ", \"seconds\": %.6f, \"clock_seconds\": %.6f"
                 ", \"host_bytes\": %" PRIu64
                 ", \"line_bytes\": %" PRIu64 ", \"board_bytes\": %" PRIu64
                 ", \"host_delivered\": %" PRIu64 ", \"rx_overflow\": %" PRIu64
                 ", \"link_error\": %d, \"host_overruns\": %" PRIu64 ", \"deaf_dropped\": %" PRIu64
                 ", \"faults_applied\": %" PRIu64 ", \"tx_framing_errors\": %" PRIu64
                 ", \"rx_pending\": %zu, \"tx_pending\": %zu, \"clocking\": %d"
                 ", \"busy\": %d, \"error\": %d"
#ifdef HAS_RESYNC
                 ", \"resyncs\": %" PRIu64
#endif
#ifdef HAS_ARMED
                 ", \"armed\": %d"
#endif
                 "}",
                 cycles_, now_s() - started_, clock_seconds_, host_bytes_, line_bytes_,
                 board_bytes_, host_delivered_, rx_overflow_, static_cast<int>(link_error_), host_overruns_,
                 deaf_dropped_, faults_applied_, tx_framing_errors_, rx_queue_.size(),
                 tx_queue_.size(), static_cast<int>(idle_left_ > 0), static_cast<int>(top_->busy),
                 static_cast<int>(top_->error)
#ifdef HAS_RESYNC
                 , resyncs_
#endif
#ifdef HAS_ARMED
                 , static_cast<int>(top_->armed)
#endif
        );
        return buf;
    }

    void reply(const std::string& text) {
        fputs(text.c_str(), stdout);
        fputc('\n', stdout);
        fflush(stdout);
    }

    void error(const std::string& what) {
        std::string esc;
        for (char c : what) {
            if (c == '"' || c == '\\') esc += '\\';
            esc += c;
        }
        reply("{\"refused\": \"" + esc + "\"}");
    }

    [[noreturn]] static void die(const char* what) {
        fprintf(stderr, "board_sim: %s: %s\n", what, strerror(errno));
        exit(1);
    }

    Options opt_;
    std::mt19937_64 rng_;
    VerilatedContext ctx_;
    std::unique_ptr<Vboard_top> top_;
#if defined(TRACE_FST)
    std::unique_ptr<VerilatedFstC> trace_;
#elif defined(TRACE_VCD)
    std::unique_ptr<VerilatedVcdC> trace_;
#endif
    int master_ = -1, slave_ = -1;
    std::string port_;
    std::string control_;
    bool quit_ = false;
    double started_ = 0, clock_seconds_ = 0;

    uint64_t cycles_ = 0, idle_left_ = 0;
    // host -> board
    std::deque<uint8_t> rx_queue_;
    bool rx_frame_ = false, rx_idle_ = true;
    uint32_t rx_bits_ = 0;
    int rx_bit_ = 0, rx_timer_ = 0, rx_delay_ = -1;
    // board -> host
    std::deque<uint8_t> tx_queue_;
    bool tx_frame_ = false;
    int tx_bit_ = 0, tx_timer_ = 0;
    uint8_t tx_shift_ = 0;
    bool link_error_ = false;
    // faults
    std::map<uint64_t, Fault> host_faults_, board_faults_;
    uint64_t deaf_at_ = NEVER;
    // counters
    uint64_t host_bytes_ = 0, host_taken_ = 0, line_bytes_ = 0, board_bytes_ = 0;
    uint64_t host_delivered_ = 0, rx_overflow_ = 0, host_overruns_ = 0, deaf_dropped_ = 0;
    uint64_t faults_applied_ = 0, tx_framing_errors_ = 0, resyncs_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the Python process that started us
    signal(SIGPIPE, SIG_IGN);
    Options opt = parse_options(argc, argv);
    Board board(opt);
    board.open_pty();
    board.run();
    return 0;
}
