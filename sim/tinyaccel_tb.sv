// Bulk stream testbench around tinyaccel_top (the Verilog of tinyaccel.hw.top.Accelerator).
//
// The clock runs inside this module (Verilator --timing), so the simulator needs no Python
// work per cycle. cocotb (tinyaccel.sim.accel_tests) only writes the cfg_* registers, bumps
// cmd_seq, and waits until done_seq equals it:
//
//   * The clock runs in bursts of up to 1000 cycles inside one simulator time slot (see the
//     clock below), so the simulator's per-slot work (its timing scheduler, the VPI callbacks of
//     cocotb's main loop) is paid once per burst, not twice per cycle. Defining
//     TB_TWO_SLOT_CLOCK (waveform builds do) gives the usual clock with two time slots per
//     period instead, whose edges a waveform viewer can show.
//
//   * The host -> accelerator byte stream is preloaded into in_mem (one host beat per word,
//     byte 0 in bits 7..0) with $fread from the binary file named by +TB_IN=<path>, which holds
//     each beat most significant byte first ($fread order).
//   * i_stream is fed from in_mem. Once a beat is offered it is held until taken; between beats
//     an LFSR inserts idle cycles with probability cfg_valid_gap/65536.
//   * o_stream is captured into out_mem; an LFSR drops `ready` with probability
//     cfg_ready_gap/65536 (back-pressure).
//   * `done` rises when the run is finished. On the last chunk of a program that means: the
//     whole input was taken, at least cfg_expect_beats beats arrived (cfg_expect_known), and
//     then for QUIET cycles no beat was taken or offered and `busy` stayed low, so surplus
//     output bytes are caught (and, without an expected count, late responses are waited for).
//     Otherwise (an intermediate chunk) it rises when the input chunk is consumed. It also
//     rises when out_mem is full (cfg_out_cap beats): cocotb reads it and continues the run.
//     A watchdog ends the run with `timed_out` after cfg_watchdog cycles without a beat moving
//     on either stream: a hang is reported, never waited for.
//   * At `done`, out_mem[0 .. out_count-1] is written with $writememh to +TB_OUT=<path>.
//
// cmd_seq commands (cfg_cmd): 0 = run (cfg_new: a new program starts, counters restart;
// cfg_reload: in_mem was rewritten, start at its beat 0), 1 = hold the DUT in reset for 8
// cycles. Every command answers by raising `done` and setting done_seq to its cmd_seq. cocotb
// waits for done_seq, not for an edge of `done`: a short command runs from start to finish
// inside one clock burst (one time slot), where `done` falls and rises again unseen.
`timescale 1ns / 1ps

module tinyaccel_tb #(
    parameter int HOST_W = 16,        // host stream width in bits
    parameter int IN_BEATS = 1 << 20,  // capacity of in_mem, in beats
    parameter int OUT_BEATS = 1 << 20  // capacity of out_mem, in beats
) ();
    localparam int QUIET = 64;  // silent cycles on o_stream before a program counts as finished

    // -- written by cocotb -----------------------------------------------------------------
    logic [31:0] cfg_in_beats /*verilator public_flat_rw*/;      // beats of in_mem to send
    logic        cfg_new /*verilator public_flat_rw*/;           // a new program starts
    logic        cfg_reload /*verilator public_flat_rw*/;        // reload in_mem, restart at 0
    logic        cfg_last /*verilator public_flat_rw*/;          // last chunk of the program
    logic        cfg_expect_known /*verilator public_flat_rw*/;  // cfg_expect_beats is valid
    logic [31:0] cfg_expect_beats /*verilator public_flat_rw*/;  // total output beats expected
    logic [15:0] cfg_valid_gap /*verilator public_flat_rw*/;     // idle probability * 65536
    logic [15:0] cfg_ready_gap /*verilator public_flat_rw*/;     // back-pressure prob. * 65536
    logic [31:0] cfg_seed /*verilator public_flat_rw*/;          // LFSR seed (nonzero)
    logic [31:0] cfg_watchdog /*verilator public_flat_rw*/;      // cycles without progress
    logic [31:0] cfg_out_cap /*verilator public_flat_rw*/;       // out_mem beats to use
    logic [1:0]  cfg_cmd /*verilator public_flat_rw*/;           // 0 = run, 1 = reset
    logic [31:0] cmd_seq /*verilator public_flat_rw*/;           // bump to issue cfg_cmd

    // -- read by cocotb ----------------------------------------------------------------------
    logic        done /*verilator public_flat_rd*/ = 0;
    logic [31:0] done_seq /*verilator public_flat_rd*/ = 0;  // cmd_seq of the last finished command
    logic        timed_out /*verilator public_flat_rd*/ = 0;
    logic        out_full /*verilator public_flat_rd*/ = 0;
    logic [31:0] in_ptr /*verilator public_flat_rd*/ = 0;      // beats taken from in_mem
    logic [31:0] out_count /*verilator public_flat_rd*/ = 0;   // beats captured in this chunk
    logic [31:0] out_total /*verilator public_flat_rd*/ = 0;   // beats captured in the program
    logic [63:0] cycles /*verilator public_flat_rd*/ = 0;      // cycles since the program began
    logic [63:0] last_beat_cycle /*verilator public_flat_rd*/ = 0;  // cycle of the last beat
    logic        error_seen /*verilator public_flat_rd*/ = 0;  // `error` was high at some cycle
    logic        busy_now /*verilator public_flat_rd*/;
    logic        error_now /*verilator public_flat_rd*/;

    logic clk;
    logic rst;

    logic [HOST_W-1:0] in_mem[IN_BEATS];
    logic [HOST_W-1:0] out_mem[OUT_BEATS];
    string in_file, out_file;

    logic [HOST_W-1:0] i_payload, o_payload;
    logic i_valid, i_ready, o_valid, o_ready, busy, error;

    tinyaccel_top dut (
        .clk(clk),
        .rst(rst),
        .i_stream__payload(i_payload),
        .i_stream__valid(i_valid),
        .i_stream__ready(i_ready),
        .o_stream__payload(o_payload),
        .o_stream__valid(o_valid),
        .o_stream__ready(o_ready),
        .busy(busy),
        .error(error)
    );

    initial begin
        clk = 0;
        if (!$value$plusargs("TB_IN=%s", in_file)) in_file = "tb_in.bin";
        if (!$value$plusargs("TB_OUT=%s", out_file)) out_file = "tb_out.hex";
        cfg_in_beats = 0;
        cfg_new = 1;
        cfg_reload = 1;
        cfg_last = 1;
        cfg_expect_known = 0;
        cfg_expect_beats = 0;
        cfg_valid_gap = 0;
        cfg_ready_gap = 0;
        cfg_seed = 32'h1;
        cfg_watchdog = 32'd1000000;
        cfg_out_cap = OUT_BEATS;
        cfg_cmd = 0;
        cmd_seq = 0;
    end

    typedef enum logic [1:0] {
        IDLE, RUN, RESET, FINISH
    } state_t;
    state_t state = RESET;
    logic [31:0] seen_seq = 0;
    logic [3:0] reset_cnt = 0;
    logic [31:0] idle_cnt = 0;  // cycles since a beat last moved
    logic [7:0] quiet_cnt = 0;  // cycles of silence (no input taken, no output offered, idle)
    logic in_hold = 0;          // a beat is offered and not yet taken: keep valid
    logic [31:0] lfsr_v = 1, lfsr_r = 2;
    // The cfg_* registers latched when a command starts. Only these copies feed the stream
    // logic: cfg_* are VPI-writable, so logic reading them would be re-evaluated by Verilator
    // as input logic on every time step. For the same reason the signals cocotb only reads are
    // public_flat_rd, not _rw, and the clock is not public at all.
    logic [31:0] in_beats_q = 0, expect_beats_q = 0, watchdog_q = 0, out_cap_q = 0;
    logic [15:0] valid_gap_q = 0, ready_gap_q = 0;
    logic last_q = 1, expect_known_q = 0;

    assign rst = (state == RESET);
    assign busy_now = busy;
    assign error_now = error;

`ifdef TB_TWO_SLOT_CLOCK
    always #5 clk = ~clk;
`else
    // Clock bursts: every time slot (#10) starts a burst of up to BURST cycles. Each edge is a
    // nonblocking assignment made when the previous edge has been processed: the rising edge's
    // processes run, the falling edge lands in the same NBA region as their register updates,
    // the combinational logic settles in the following active region, and only then does the
    // next rising edge land (NBA again), so every cycle sees settled inputs. A burst stops early
    // once the command is finished (state IDLE: `done` is high and cocotb has to act).
    // Each cycle costs about two iterations of the simulator's NBA loop; BURST stays well below
    // the simulator's --converge-limit (10000 iterations per time slot).
    localparam int BURST = 1000;
    logic kick = 0, kick_seen = 0;
    logic [15:0] burst_left = 0;
    always #10 kick = ~kick;
    always @(kick or clk) begin
        if (clk) begin
            clk <= 0;
        end else if (kick != kick_seen) begin
            kick_seen <= kick;
            burst_left <= 16'(BURST - 1);
            clk <= 1;
        end else if (burst_left != 0 && state != IDLE) begin
            burst_left <= burst_left - 1;
            clk <= 1;
        end
    end
`endif

    // The input chunk: binary, one beat per HOST_W/8 bytes, most significant byte first. $fread
    // reads bytes, where $readmemh would parse twice as many hex digits.
    task automatic load_input();
        integer fd;
        fd = $fopen(in_file, "rb");
        if (fd == 0) $fatal(1, "tinyaccel_tb: cannot open %s", in_file);
        void'($fread(in_mem, fd));
        $fclose(fd);
    endtask

    // xorshift32 generators; the top 16 bits decide gaps.
    function automatic logic [31:0] xorshift(input logic [31:0] x);
        logic [31:0] y;
        y = x ^ (x << 13);
        y = y ^ (y >> 17);
        return y ^ (y << 5);
    endfunction

    wire in_left = (in_ptr < in_beats_q);
    assign i_valid = (state == RUN) && in_left && (in_hold || lfsr_v[31:16] >= valid_gap_q);
    assign i_payload = in_mem[in_ptr[$clog2(IN_BEATS)-1:0]];
    wire out_room = (out_count < OUT_BEATS) && (out_count < out_cap_q);
    assign o_ready = (state == RUN) && out_room && (lfsr_r[31:16] >= ready_gap_q);

    wire in_fire = i_valid && i_ready;
    wire out_fire = o_valid && o_ready;
    wire input_done = !in_left;
    wire output_done = !expect_known_q || out_total >= expect_beats_q;
    wire finished = !out_room || (last_q
        ? (input_done && output_done && !busy && quiet_cnt >= QUIET)
        : input_done);

    always @(posedge clk) begin
        case (state)
            IDLE: begin
                if (cmd_seq != seen_seq) begin
                    seen_seq <= cmd_seq;
                    in_beats_q <= cfg_in_beats;
                    expect_beats_q <= cfg_expect_beats;
                    expect_known_q <= cfg_expect_known;
                    last_q <= cfg_last;
                    valid_gap_q <= cfg_valid_gap;
                    ready_gap_q <= cfg_ready_gap;
                    watchdog_q <= cfg_watchdog;
                    out_cap_q <= cfg_out_cap;
                    done <= 0;
                    timed_out <= 0;
                    out_full <= 0;
                    if (cfg_cmd == 2'd1) begin
                        state <= RESET;
                        reset_cnt <= 0;
                    end else begin
                        if (cfg_reload) begin
                            load_input();
                            in_ptr <= 0;
                        end
                        if (cfg_new) begin
                            out_total <= 0;
                            cycles <= 0;
                            last_beat_cycle <= 0;
                            error_seen <= 0;
                        end
                        out_count <= 0;
                        idle_cnt <= 0;
                        quiet_cnt <= 0;
                        in_hold <= 0;
                        lfsr_v <= (cfg_seed == 0) ? 32'h1 : cfg_seed;
                        lfsr_r <= xorshift((cfg_seed == 0) ? 32'h1 : cfg_seed) ^ 32'h9E3779B9;
                        state <= RUN;
                    end
                end
            end
            RESET: begin
                reset_cnt <= reset_cnt + 1;
                if (reset_cnt == 4'd7) begin
                    state <= IDLE;
                    done <= 1;
                    done_seq <= seen_seq;
                end
            end
            RUN: begin
                lfsr_v <= xorshift(lfsr_v);
                lfsr_r <= xorshift(lfsr_r);
                cycles <= cycles + 1;
                in_hold <= i_valid && !i_ready;
                if (error) error_seen <= 1;
                if (in_fire) in_ptr <= in_ptr + 1;
                if (out_fire) begin
                    out_mem[out_count[$clog2(OUT_BEATS)-1:0]] <= o_payload;
                    out_count <= out_count + 1;
                    out_total <= out_total + 1;
                end
                if (in_fire || out_fire) begin
                    idle_cnt <= 0;
                    last_beat_cycle <= cycles + 1;
                end else begin
                    idle_cnt <= idle_cnt + 1;
                end
                // Silence: no input beat taken, nothing offered on o_stream, busy low.
                if (in_fire || o_valid || busy) quiet_cnt <= 0;
                else if (quiet_cnt != 8'hFF) quiet_cnt <= quiet_cnt + 1;
                if (finished) begin
                    out_full <= !out_room;
                    state <= FINISH;
                end else if (idle_cnt >= watchdog_q) begin
                    timed_out <= 1;
                    state <= FINISH;
                end
            end
            FINISH: begin
                if (out_count != 0) $writememh(out_file, out_mem, 0, out_count - 1);
                done <= 1;
                done_seq <= seen_seq;
                state <= IDLE;
            end
        endcase
    end
endmodule
