"""Speed-ups on top of a placement: the attention kernel and regional ``torch.compile``.

None of these moves weights between devices, so they combine with any strategy that keeps the transformer
where it runs:

* **Attention** (:mod:`.attention`): the fastest exact kernel for this GPU and shape, measured once.
* **Compile** (:mod:`.compile`): the transformer's repeated blocks, the text encoder, the VAE's decoder and
  the fp8 layers of streamed blocks, each compiled once the work ahead pays for its compile.

:class:`SpeedupDriver` applies both for a Generator, before each image. Quantized weights (torchao fp8 or
int8, a third speed-up) are made in :mod:`zimage_turbo.quantize`; here they only change what compiling the
blocks saves.
"""

from .driver import SpeedupDriver

__all__ = ["SpeedupDriver"]
