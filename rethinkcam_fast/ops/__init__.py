"""One file per op (Triton kernels, native launchers, custom ops, pure-PyTorch reference).

The public entry points are re-exported from :mod:`rethinkcam_fast`; the submodules are kept
addressable here (``rethinkcam_fast.ops.tap`` is the module, not the function).
"""
