"""A Stable Diffusion pipeline from disk, and prompts whose class token is an embedding we give.

Real runs load SD v1.4 in diffusers format (a folder with model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/). Tests and the demo write a
tiny randomly initialised pipeline of the same architecture with
`write_tiny_pipeline` and load it the same way, so one code path serves both;
its images exercise that path and mean nothing.

The class token: prompts are a template like "a high-quality photo of a {}"
whose {} becomes a placeholder token added to the tokenizer. A forward hook on
the text encoder's token-embedding table puts one given vector per prompt at
the placeholder's position, so the vector goes through the whole text encoder
as a learned token would (textual-inversion style), batch by batch.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ood.io import atomic_dir

PLACEHOLDER = "<ood-class>"
DEFAULT_TEMPLATE = "a high-quality photo of a {}"
TINY_MAX_TOKENS = 32  # the tiny text encoder's context (SD's is 77)


class PipelineError(ValueError):
    """A pipeline folder is missing or unusable, or a prompt cannot carry the class token."""


def _tiny_vocab() -> dict[str, int]:
    """A character-level CLIP vocabulary: every word splits into single letters."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789-.,'":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(f"{char}</w>", len(vocab))
    return vocab


def write_tiny_pipeline(out_dir: str | os.PathLike, seed: int = 0, resolution: int = 32) -> Path:
    """Write a tiny, randomly initialised SD pipeline (diffusers format) to `out_dir`.

    Same component types as SD v1.4 (CLIP text encoder, conditional UNet with
    cross-attention, KL autoencoder, PNDM scheduler with SD's beta schedule),
    a few thousand times smaller. Seeded: the same seed writes the same weights.
    """
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        # transformers 5 builds a CLIPTokenizer only from a folder holding these two files.
        token_dir = tmp / ".vocab"
        token_dir.mkdir()
        vocab = _tiny_vocab()
        (token_dir / "vocab.json").write_text(json.dumps(vocab))
        (token_dir / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer.from_pretrained(token_dir, model_max_length=TINY_MAX_TOKENS)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=TINY_MAX_TOKENS,
                projection_dim=32,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=resolution // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[16, 32],
            latent_channels=4,
            norm_num_groups=16,
            sample_size=resolution,
        )
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
        for item in (tmp / "pipeline").iterdir():
            item.rename(tmp / item.name)
        (tmp / "pipeline").rmdir()
        for item in token_dir.iterdir():
            item.unlink()
        token_dir.rmdir()
    return out_dir


def _check_folder(path: Path) -> None:
    if not (path / "model_index.json").is_file():
        raise PipelineError(
            f"{path}: no model_index.json; point the config's synthesis pipeline at a "
            "Stable Diffusion folder in diffusers format (e.g. CompVis/stable-diffusion-v1-4 "
            "downloaded with its unet/, vae/, text_encoder/, tokenizer/ and scheduler/)"
        )


def _add_placeholder(tokenizer, text_encoder) -> int:
    """The placeholder's token id, added (with a new embedding row) if the tokenizer lacks it."""
    if tokenizer.add_tokens([PLACEHOLDER]):
        # The new row's value never matters: the hook replaces it in every prompt.
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer.convert_tokens_to_ids(PLACEHOLDER)


def load_text_encoder(path: str | os.PathLike, placeholder: bool = True):
    """`(tokenizer, text_encoder)` of a pipeline folder (no UNet or VAE loaded); with
    `placeholder`, the class token added (its embedding row is random, so statistics
    of the token table are taken without it)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    _check_folder(path)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
    if placeholder:
        _add_placeholder(tokenizer, text_encoder)
    return tokenizer, text_encoder.eval()


def load_pipeline(
    path: str | os.PathLike,
    device: torch.device,
    *,
    fp16: bool = False,
    attention_slicing: bool = False,
):
    """The pipeline at `path` on `device`, with PLMS sampling and the placeholder token.

    `fp16` halves memory and time on a GPU; `attention_slicing` computes
    attention in slices, for GPUs with little memory. No safety checker: the
    images are outliers for training, not for people.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    path = Path(path)
    _check_folder(path)
    if fp16 and device.type != "cuda":
        raise PipelineError("fp16 synthesis needs a CUDA device (set fp16: false on CPU)")
    pipe = StableDiffusionPipeline.from_pretrained(
        path,
        dtype=torch.float16 if fp16 else torch.float32,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    # PNDM without its Runge-Kutta warm-up steps is PLMS, DreamOOD's sampler.
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.set_progress_bar_config(disable=True)  # the shard loop has its own bar
    if attention_slicing:
        pipe.enable_attention_slicing()
    _add_placeholder(pipe.tokenizer, pipe.text_encoder)
    return pipe.to(device)


def token_embeddings(text_encoder) -> torch.Tensor:
    """The text encoder's (vocab, D) input token-embedding table."""
    return text_encoder.get_input_embeddings().weight


@contextlib.contextmanager
def _token_replaced(text_encoder, token_id: int, vectors: torch.Tensor) -> Iterator[None]:
    """Within the block, the embedding of `token_id` in row b of a batch is vectors[b]."""

    def hook(_module, inputs, output):
        mask = inputs[0] == token_id
        if int(mask.sum()) != len(vectors) or not bool((mask.sum(1) == 1).all()):
            raise PipelineError(f"each prompt must hold the class token once ({PLACEHOLDER})")
        output = output.clone()
        output[mask] = vectors.to(dtype=output.dtype, device=output.device)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class PromptEncoder:
    """Text-encoder states of `template` with its class token set to given vectors."""

    def __init__(self, tokenizer, text_encoder, template: str = DEFAULT_TEMPLATE):
        if template.count("{}") != 1:
            raise PipelineError(f"prompt template {template!r} must contain {{}} exactly once")
        self.template = template
        self.text_encoder = text_encoder
        self.token_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        self.ids = tokenizer(
            template.format(PLACEHOLDER),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        if not bool((self.ids == self.token_id).any()):
            raise PipelineError(
                f"prompt template {template!r} is longer than the text encoder's "
                f"{tokenizer.model_max_length} tokens: the class token was cut off"
            )
        self.position = int((self.ids[0] == self.token_id).nonzero()[0, 0])
        self.empty_ids = tokenizer(
            "", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids

    def prompt(self) -> str:
        """The prompt as text, the class token shown as the placeholder."""
        return self.template.format(PLACEHOLDER)

    @torch.no_grad()
    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, D) token vectors -> (B, L, H) text-encoder states, SD's conditioning."""
        device = self.text_encoder.device
        ids = self.ids.expand(len(vectors), -1).to(device)
        with _token_replaced(self.text_encoder, self.token_id, vectors):
            return self.text_encoder(ids)[0]

    @torch.no_grad()
    def empty(self, batch: int) -> torch.Tensor:
        """States of the empty prompt, classifier-free guidance's unconditional branch."""
        states = self.text_encoder(self.empty_ids.to(self.text_encoder.device))[0]
        return states.expand(batch, -1, -1)
