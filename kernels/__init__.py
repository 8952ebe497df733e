"""Triton kernels of incrementer_fast, installed as `incrementer_fast.kernels`.

One op per module: kernels first, then their launchers. Launchers take and return torch tensors; the
registration as custom ops and the autograd wiring live in `incrementer_fast.ops`. Host helpers shared by
the launchers (dtypes, tiles, warps, stride merging, devices) live in `utils`.
"""
