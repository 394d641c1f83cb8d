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
