"""Outlier synthesis in Stable Diffusion's text-conditioned space (DreamOOD style, for OAML).

Three steps, one module each:
- `pipeline`: load a diffusers Stable Diffusion pipeline from disk (SD v1.4 for
  real runs, a tiny randomly initialised one for tests and the demo) and encode
  prompts whose class token is replaced by a given embedding;
- `embeddings`: learn one token embedding per ID class aligned with the ID
  images, then sample low-likelihood embeddings near each class's boundary;
- `generate`: decode the sampled embeddings shard by shard (resumable), write
  images, latents, contact sheets, and collect the shards into an outlier set.
"""


def check_positive(settings: object, names: tuple[str, ...]) -> None:
    """Each named integer setting is >= 1; the error names the setting."""
    for name in names:
        if int(getattr(settings, name)) < 1:
            raise ValueError(
                f"synthesis setting {name}: must be >= 1, got {getattr(settings, name)}"
            )


def settings_from_dict(cls, values: dict, what: str):
    """`cls(**values)` for a settings dataclass; unknown keys are an error naming them."""
    known = sorted(cls.__dataclass_fields__)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; known: {known}")
    return cls(**values)
