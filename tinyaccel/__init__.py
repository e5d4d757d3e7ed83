"""tinyaccel: an open hardware/software co-design kit for on-device learning.

Subpackages map to the top-level folders of the repository:
``tinyaccel.hw`` (Amaranth accelerator), ``tinyaccel.sim`` (golden model, testbenches),
``tinyaccel.sw`` (quantizer, compiler, runtime), ``tinyaccel.models``, ``tinyaccel.boards``.
"""

__version__ = "0.1.0"
