"""How big the model is, and how much memory each phase needs on top of the weights, without loading it.

Weight sizes come from the safetensors headers (the first few kilobytes of each shard) and are converted to
the dtype we will run in: the published transformer is stored in float32, so its 24.6 GB on disk become
12.3 GB in bfloat16. Each component is split into its repeated blocks (the unit that block-level offloading
moves) and the rest.

Activation peaks (memory a phase allocates beyond the weights) follow a linear model in the quantity that
drives each phase, scaled by the architecture so that one calibration serves every size:

* text encoder: ``k_te * prompts * tokens * hidden * dtype_bytes``, tokens = 512 (diffusers pads to it);
* transformer:  ``k_tr * batch * (image tokens + caption tokens) * dim * dtype_bytes`` per pass
  (batch doubles with classifier-free guidance);
* VAE decode:   ``k_vae * images * pixels * channels[0] * dtype_bytes``, or with tiling the same for one
  512x512 tile plus the assembled image;
* VAE encode of input images (image-to-image, inpainting, ControlNet): the same form, for the largest batch the
  encoder takes at once. Not calibrated yet: it uses the decoder's constant (an over-estimate: the encoder's
  widest full-resolution tensors have half the decoder's channels) and 0.45 of its time (the encoder's share of
  the convolution work of the full-size VAE, counted: 0.43);
* a ControlNet (when the profile has one, :meth:`ModelProfile.with_controlnet`) adds its weights, and to each
  pass of a request that uses it the hints it hands the transformer, kept while both run: one token-sized tensor
  per control block, held twice while the ControlNet stacks them. Its time is the transformer's per byte of
  blocks, for its own blocks and the transformer's refiner blocks it runs again. Estimated from the
  architecture, not measured yet.

The ``k`` constants were measured on a GPU with the full-size checkpoint (``benchmarks/calibrate.py``); the
measurements and the fit live in ``calibration.json`` beside this file, read by
:mod:`~zimage_turbo.activation_model`. The time constants are that GPU's (an
H200); :meth:`ModelProfile.on` rescales them to another GPU's measured speeds (:mod:`zimage_turbo.calibration`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from .activation_model import Calibration, load_calibration
from .hardware import DeviceSpeeds
from .layout import PipelineLayout
from .model import CAPTION_TOKENS, MAX_SEQUENCE_LENGTH, PRESETS, VAE_TILE_PIXELS
from .quiet_imports import quiet_imports
from .safetensors_header import read_safetensors_header

if TYPE_CHECKING:
    from .request import GenerationRequest

__all__ = [
    "ComponentProfile",
    "ModelProfile",
    "Workload",
    "component_profile",
    "read_safetensors_shapes",
]

# The text encoder sees at most this many tokens, chat template included: diffusers pads every prompt to it and
# cuts longer ones silently.
_WEIGHTED = ("transformer", "text_encoder", "vae")
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I8": 1,
    "U8": 1,
}
# Which tensors belong to a repeated block, per component: the prefix up to the block index.
_BLOCK_PATTERNS = {
    "transformer": re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+)\."),
    "text_encoder": re.compile(r"^((?:model\.)?layers\.\d+)\."),
    "controlnet": re.compile(r"^((?:control_layers|control_noise_refiner)\.\d+)\."),
    "vae": re.compile(r"^((?:encoder|decoder)\.(?:down_blocks|up_blocks)\.\d+)\."),
}


@dataclass(frozen=True)
class Workload:
    """What one generation asks of memory: image size, images per batch, and whether guidance doubles it."""

    height: int = 1024
    width: int = 1024
    images: int = 1
    guidance: bool = False
    vae_tiling: bool = False
    # the batch of each pass of the VAE encoder over input images at the output's size (none for text-to-image)
    image_encodes: tuple[int, ...] = ()
    # the ControlNet runs beside the transformer at each pass
    control: bool = False

    @classmethod
    def of(cls, request: GenerationRequest) -> Workload:
        """The workload of a generation request."""
        inputs = request.inputs
        return cls(
            height=request.height,
            width=request.width,
            images=request.num_images,
            guidance=request.guidance_scale > 0,
            image_encodes=inputs.encoder_batches(request.num_images) if inputs is not None else (),
            control=inputs is not None and inputs.control is not None,
        )

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    @property
    def transformer_batch(self) -> int:
        return self.images * (2 if self.guidance else 1)


@dataclass(frozen=True)
class ComponentProfile:
    """One component's weights at the run dtype."""

    name: str
    weight_bytes: int
    block_bytes: tuple[int, ...] = ()  # each repeated block, in execution order
    largest_tensor_bytes: int = 0
    block_names: tuple[str, ...] = ()  # module names of the blocks ("layers.0"...), same order
    largest_block_tensor_bytes: int = 0  # the largest single tensor inside the blocks

    @property
    def other_bytes(self) -> int:
        """Weights outside the repeated blocks (embeddings, norms, heads)."""
        return self.weight_bytes - sum(self.block_bytes)

    @property
    def largest_block_bytes(self) -> int:
        return max(self.block_bytes, default=0)


@dataclass(frozen=True)
class ModelProfile:
    """Sizes and activation model of one Z-Image checkpoint at one dtype. Plain data; build by hand in tests."""

    transformer: ComponentProfile
    text_encoder: ComponentProfile
    vae: ComponentProfile
    dtype_bytes: int = 2
    transformer_dim: int = 3840
    transformer_ffn: int = 10240
    transformer_layers: int = 34  # main layers + noise and context refiners
    text_hidden: int = 2560
    vae_channels: int = 128
    calibration: Calibration = field(default_factory=load_calibration)
    controlnet: ComponentProfile | None = None  # a ControlNet loaded (or about to be) beside the transformer

    @property
    def components(self) -> tuple[ComponentProfile, ...]:
        """Every weighted component: the text encoder, the transformer, the VAE and the ControlNet if any."""
        parts = (self.text_encoder, self.transformer, self.vae)
        return parts if self.controlnet is None else (*parts, self.controlnet)

    def with_controlnet(self, controlnet: ComponentProfile | None) -> ModelProfile:
        """This profile with ``controlnet`` beside the transformer (None: without one)."""
        return replace(self, controlnet=controlnet)

    @property
    def weight_bytes(self) -> int:
        return sum(c.weight_bytes for c in self.components)

    # -- activations (bytes beyond the weights, per phase) ------------------------------------------------

    def encode_activation_bytes(self, work: Workload) -> int:
        prompts = 2 if work.guidance else 1
        return int(
            self.calibration.text_encoder_k * prompts * MAX_SEQUENCE_LENGTH * self.text_hidden * self.dtype_bytes
        )

    def denoise_activation_bytes(self, work: Workload) -> int:
        tokens = work.image_tokens + CAPTION_TOKENS
        per_pass = self.calibration.transformer_k * work.transformer_batch * tokens * self.transformer_dim
        if work.control and self.controlnet is not None:
            # one hint per control block (and the stream they come from), held twice while they are stacked
            hints = len(self.controlnet.block_bytes) + 1
            per_pass += 2 * hints * work.transformer_batch * tokens * self.transformer_dim
        return int(per_pass * self.dtype_bytes)

    def decode_activation_bytes(self, work: Workload) -> int:
        per_pixel = self.vae_channels * self.dtype_bytes
        if work.vae_tiling and max(work.height, work.width) > VAE_TILE_PIXELS:
            # one tile at a time, plus the decoded image being assembled (3 channels)
            tile = self.calibration.vae_tiled_k * VAE_TILE_PIXELS**2 * per_pixel
            return int(tile + work.images * work.pixels * 3 * 4)
        return int(self.calibration.vae_k * work.images * work.pixels * per_pixel)

    def encode_image_activation_bytes(self, work: Workload) -> int:
        """The VAE encoder's peak over the input images: its largest batch (0 without input images)."""
        batch = max(work.image_encodes, default=0)
        if not batch:
            return 0
        per_pixel = self.vae_channels * self.dtype_bytes
        image = batch * work.pixels * 3 * 4  # the float32 input, beside the encoder's own tensors
        if work.vae_tiling and max(work.height, work.width) > VAE_TILE_PIXELS:
            return int(self.calibration.encode_k * VAE_TILE_PIXELS**2 * per_pixel + image)
        return int(self.calibration.encode_k * batch * work.pixels * per_pixel + image)

    def activation_bytes(self, work: Workload) -> dict[str, int]:
        """Activation peak of each phase: ``encode``, ``encode_image``, ``denoise``, ``decode``."""
        return {
            "encode": self.encode_activation_bytes(work),
            "encode_image": self.encode_image_activation_bytes(work),
            "denoise": self.denoise_activation_bytes(work),
            "decode": self.decode_activation_bytes(work),
        }

    # -- time (seconds on the calibration GPU) --------------------------------------------------------------

    def transformer_pass_tflop(self, work: Workload) -> float:
        """Floating-point work of one transformer pass, in TFLOP (linear layers and attention)."""
        tokens = work.image_tokens + CAPTION_TOKENS
        linear = 2 * (4 * self.transformer_dim**2 + 3 * self.transformer_dim * self.transformer_ffn)
        attention = 4 * tokens * self.transformer_dim
        return work.transformer_batch * self.transformer_layers * tokens * (linear + attention) / 1e12

    def compute_seconds(self, work: Workload, steps: int) -> dict[str, float]:
        """Seconds of pure compute per phase, everything resident on the calibration GPU."""
        cal = self.calibration
        tiled = cal.vae_tiling_slowdown if work.vae_tiling else 1.0
        per_pass = cal.transformer_pass_s_fixed + self.transformer_pass_tflop(work) * cal.transformer_pass_s_per_tflop
        return {
            "encode": cal.text_encoder_s * (2 if work.guidance else 1),
            "encode_image": cal.encode_s_per_megapixel * sum(work.image_encodes) * work.pixels / 1e6 * tiled,
            "denoise": steps * per_pass * (1 + self.control_share(work)),
            "decode": cal.vae_s_per_megapixel * work.images * work.pixels / 1e6 * tiled,
        }

    def control_share(self, work: Workload) -> float:
        """The ControlNet's work per pass relative to the transformer's, for a request that uses it: its blocks
        and the transformer's refiner blocks (which it runs again), per byte of the transformer's blocks."""
        if not work.control or self.controlnet is None:
            return 0.0
        blocks = zip(self.transformer.block_names, self.transformer.block_bytes, strict=True)
        refiners = sum(size for name, size in blocks if "refiner" in name)
        return (sum(self.controlnet.block_bytes) + refiners) / max(sum(self.transformer.block_bytes), 1)

    def transfer_seconds(self, nbytes: float) -> float:
        """Seconds to copy ``nbytes`` from pinned host memory to the GPU."""
        return nbytes / (self.calibration.pinned_gib_per_s * 2**30)

    def on(self, speeds: DeviceSpeeds | None) -> ModelProfile:
        """This profile with its time model for a GPU of ``speeds`` (itself for None): see :meth:`Calibration.on`."""
        return self if speeds is None else replace(self, calibration=self.calibration.on(speeds))

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_shapes(
        cls,
        shapes: Mapping[str, Mapping[str, tuple[str, tuple[int, ...]]]],
        configs: Mapping[str, Mapping[str, Any]],
        *,
        dtype_bytes: int = 2,
    ) -> ModelProfile:
        """From each component's tensor shapes (name -> (safetensors dtype, shape)) and config."""
        parts = {name: component_profile(name, shapes[name], dtype_bytes) for name in _WEIGHTED}
        return cls(
            transformer=parts["transformer"],
            text_encoder=parts["text_encoder"],
            vae=parts["vae"],
            dtype_bytes=dtype_bytes,
            **_architecture(configs),
        )

    @classmethod
    def from_layout(cls, layout: PipelineLayout, *, dtype_bytes: int = 2) -> ModelProfile:
        """Read sizes from the safetensors headers of a checked folder (no weights are read)."""
        shapes: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {name: {} for name in _WEIGHTED}
        for name in _WEIGHTED:
            for path in layout.weight_paths(name):
                shapes[name].update(read_safetensors_shapes(path))
        configs = {name: _read_config(layout.root / name) for name in _WEIGHTED}
        return cls.from_shapes(shapes, configs, dtype_bytes=dtype_bytes)

    @classmethod
    def from_modules(cls, modules: Mapping[str, Any]) -> ModelProfile:
        """Sizes of live modules (``transformer``, ``text_encoder``, ``vae``) as they are in memory now."""
        states = {name: modules[name].state_dict() for name in _WEIGHTED}
        shapes = {
            name: {key: (_dtype_name(t.dtype), tuple(t.shape)) for key, t in state.items()}
            for name, state in states.items()
        }
        floats = [t.element_size() for state in states.values() for t in state.values() if t.is_floating_point()]
        configs = {name: _config_dict(modules[name]) for name in _WEIGHTED}
        return cls.from_shapes(shapes, configs, dtype_bytes=max(floats, default=2))

    @classmethod
    def z_image_turbo(cls, *, dtype_bytes: int = 2) -> ModelProfile:
        """The real Z-Image-Turbo, from its architecture (for planning before anything is downloaded)."""
        return _reference_profile(dtype_bytes)


def read_safetensors_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors header, after checking the file is not truncated."""
    return {entry.name: (entry.dtype_name, entry.shape) for entry in read_safetensors_header(path)}


def component_profile(
    name: str, shapes: Mapping[str, tuple[str, tuple[int, ...]]], dtype_bytes: int = 2
) -> ComponentProfile:
    """One component's profile (``transformer``, ``text_encoder``, ``vae`` or ``controlnet``) from its tensor
    shapes (name -> (safetensors dtype, shape)) at the run dtype."""
    pattern = _BLOCK_PATTERNS[name]
    blocks: dict[str, int] = {}
    total = largest = largest_in_block = 0
    for key, (dtype, shape) in shapes.items():
        element = dtype_bytes if dtype.startswith(("F", "BF")) else _DTYPE_BYTES.get(dtype, dtype_bytes)
        nbytes = math.prod(shape) * element
        total += nbytes
        largest = max(largest, nbytes)
        match = pattern.match(key)
        if match:
            blocks[match.group(1)] = blocks.get(match.group(1), 0) + nbytes
            largest_in_block = max(largest_in_block, nbytes)
    names = sorted(blocks, key=_execution_order)
    return ComponentProfile(
        name=name,
        weight_bytes=total,
        block_bytes=tuple(blocks[n] for n in names),
        largest_tensor_bytes=largest,
        block_names=tuple(names),
        largest_block_tensor_bytes=largest_in_block,
    )


_STAGE_ORDER = {"noise_refiner": 0, "context_refiner": 1, "layers": 2, "encoder": 0, "decoder": 1}
_STAGE_ORDER |= {"control_noise_refiner": 0, "control_layers": 1}  # the ControlNet's, in the 2.1 Union's order


def _execution_order(block: str) -> tuple[int, str, int]:
    """Sort key: the transformer runs noise refiner, context refiner, then the main layers; numbers numerically."""
    head, _, index = block.rpartition(".")
    stage = head.split(".")[-1] if head.split(".")[-1] in _STAGE_ORDER else head.split(".")[0]
    return (_STAGE_ORDER.get(stage, 3), head, int(index))


def _config_dict(module: Any) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def _dtype_name(dtype: Any) -> str:
    """The safetensors name of a torch dtype (floating types only matter here)."""
    return "F32" if getattr(dtype, "is_floating_point", False) else "I64"


def _read_config(folder: Path) -> dict[str, Any]:
    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


class _Architecture(TypedDict):
    transformer_dim: int
    transformer_ffn: int
    transformer_layers: int
    text_hidden: int
    vae_channels: int


def _architecture(configs: Mapping[str, Mapping[str, Any]]) -> _Architecture:
    transformer, text, vae = configs["transformer"], configs["text_encoder"], configs["vae"]
    dim = int(transformer.get("dim", 3840))
    refiners = int(transformer.get("n_refiner_layers", 2))
    return {
        "transformer_dim": dim,
        "transformer_ffn": int(dim / 3 * 8),  # ZImageTransformerBlock's SwiGLU width
        "transformer_layers": int(transformer.get("n_layers", 30)) + 2 * refiners,
        "text_hidden": int(text.get("hidden_size", 2560)),
        "vae_channels": int(vae.get("block_out_channels", [128])[0]),
    }


@cache
def _reference_profile(dtype_bytes: int) -> ModelProfile:
    """Shapes of the real model, from the full checkpoint preset built on the meta device (no memory)."""
    import torch

    with quiet_imports():
        from diffusers import AutoencoderKL, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

    spec = PRESETS["full"]
    with torch.device("meta"):
        modules = {
            "transformer": ZImageTransformer2DModel(**spec.transformer),
            "text_encoder": Qwen3Model(Qwen3Config(**spec.text_encoder)),
            "vae": AutoencoderKL(**spec.vae),
        }
    shapes = {
        name: {key: ("BF16", tuple(t.shape)) for key, t in module.state_dict().items()}
        for name, module in modules.items()
    }
    configs = {"transformer": spec.transformer, "text_encoder": spec.text_encoder, "vae": spec.vae}
    return ModelProfile.from_shapes(shapes, configs, dtype_bytes=dtype_bytes)
