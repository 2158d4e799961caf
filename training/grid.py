"""PNG sample grids of the EMA generator: sources x target domains, latent- and reference-guided."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from lanit_rt.checkpoint import atomic_write


def to_uint8_image(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return array.permute(0, 2, 3, 1).numpy()


def tile(rows: Sequence[Sequence[np.ndarray | None]], size: int, pad: int = 2) -> Image.Image:
    """A grid of [H, W, 3] uint8 tiles (None -> white), `pad` pixels apart."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    canvas = np.full((n_rows * (size + pad) + pad, n_cols * (size + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell is not None:
                top, left = pad + i * (size + pad), pad + j * (size + pad)
                canvas[top: top + size, left: left + size] = cell
    return Image.fromarray(canvas)


@torch.no_grad()
def save_sample_grid(path: Path, ema, images, pool: torch.Tensor, labels: torch.Tensor,
                     domains: Sequence[str], seed: int = 0, device: torch.device | str = "cpu",
                     num_sources: int = 6, num_refs: int = 5) -> Path:
    """Two stacked grids. Latent-guided: rows = sources; columns = source, then one column per
    domain (single-domain target, one fixed z per row). Reference-guided: first row = references;
    each source translated with each reference's style (its own pseudo-label as target)."""
    gen = torch.Generator().manual_seed(seed)
    picks = pool[torch.randperm(len(pool), generator=gen)[: num_sources + num_refs]]
    src_idx, ref_idx = picks[:num_sources], picks[num_sources:]
    sources = images.batch(src_idx, device=device)
    refs = images.batch(ref_idx, device=device)
    n, d = sources.shape[0], len(domains)
    z = torch.randn(n, ema.mapping.config.latent_dim, generator=gen).to(device)

    eye = torch.eye(d, device=device)
    latent_cols = []
    for k in range(d):
        style = ema.mapping(z, eye[k].expand(n, d))
        latent_cols.append(to_uint8_image(ema.generator(sources, style)))
    src_tiles = to_uint8_image(sources)
    rows = [[src_tiles[i]] + [col[i] for col in latent_cols] for i in range(n)]
    rows.append([None])

    ref_labels = labels[ref_idx.to(labels.device)].to(device)
    ref_styles = ema.style_encoder(refs, ref_labels)  # [R, S]
    ref_tiles = to_uint8_image(refs)
    rows.append([None] + list(ref_tiles))
    ref_cols = [to_uint8_image(ema.generator(sources, ref_styles[r].expand(n, -1)))
                for r in range(len(ref_idx))]
    rows.extend([src_tiles[i]] + [col[i] for col in ref_cols] for i in range(n))

    grid = tile(rows, sources.shape[-1])
    zoom = max(1, 128 // sources.shape[-1])  # small models: enlarge (nearest) so faces stay visible
    if zoom > 1:
        grid = grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path
