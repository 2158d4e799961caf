"""PNG sample grids of the EMA generator: sources x target domains, latent- and reference-guided."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

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


def text_font(size: int = 11):
    """Pillow's default font at `size` px (its fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = 2) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` (a long word stays whole)."""
    lines = [""]
    for word in text.split(" "):
        trial = (lines[-1] + " " + word).strip()
        if draw.textlength(trial, font=font) <= width or not lines[-1]:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines[:max_lines]


def labelled(grid: Image.Image, title: str, columns: Sequence[str], cell: int, pad: int,
             row_label: str | None = None) -> Image.Image:
    """`grid` (tiles `cell` px wide, `pad` apart) under a title line and one caption per column;
    `row_label` is written into the empty top-left tile, if any."""
    font, title_font = text_font(max(11, cell // 9)), text_font(max(12, cell // 7))
    line = font.size + 3 if hasattr(font, "size") else 14
    header = (title_font.size + 8 if hasattr(title_font, "size") else 18) + 2 * line + 4
    out = Image.new("RGB", (grid.width, grid.height + header), "white")
    out.paste(grid, (0, header))
    draw = ImageDraw.Draw(out)
    draw.text((pad, 2), title, fill="black", font=title_font)
    for c, caption in enumerate(columns):
        for k, text in enumerate(wrap_text(draw, caption, font, cell)):
            draw.text((pad + c * (cell + pad), header - 2 * line - 2 + k * line), text, fill="black",
                      font=font)
    if row_label:
        for k, text in enumerate(wrap_text(draw, row_label, font, cell, 3)):
            draw.text((pad, header + pad + cell // 3 + k * line), text, fill="gray", font=font)
    return out


@torch.no_grad()
def save_sample_grid(path: Path, ema, images, pool: torch.Tensor, labels: torch.Tensor,
                     domains: Sequence[str], seed: int = 0, device: torch.device | str = "cpu",
                     num_sources: int = 6, num_refs: int = 5, step: int | None = None) -> Path:
    """Two labelled grids, one above the other. Latent-guided: rows = sources; columns = source,
    then one column per domain (single-domain target, one fixed z per row). Reference-guided: the
    first row holds the references; each source is translated with each reference's style (its
    own pseudo-label as target)."""
    # A pool smaller than both together is split between them, so neither half comes out empty.
    num_refs = min(num_refs, len(pool) // 2)
    num_sources = min(num_sources, len(pool) - num_refs)
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
    latent_rows = [[src_tiles[i]] + [col[i] for col in latent_cols] for i in range(n)]

    ref_labels = labels[ref_idx.to(labels.device)].to(device)
    ref_styles = ema.style_encoder(refs, ref_labels)  # [R, S]
    ref_tiles = to_uint8_image(refs)
    ref_cols = [to_uint8_image(ema.generator(sources, ref_styles[r].expand(n, -1)))
                for r in range(len(ref_idx))]
    ref_rows = [[None] + list(ref_tiles)]
    ref_rows.extend([src_tiles[i]] + [col[i] for col in ref_cols] for i in range(n))

    size, pad = sources.shape[-1], 2
    zoom = max(1, 128 // size)  # small models: enlarge (nearest) so faces stay visible
    cell = size * zoom

    def zoomed(rows) -> Image.Image:
        grid = tile(rows, size, pad)
        return grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST) if zoom > 1 else grid

    at = "" if step is None else f" (step {step})"
    ref_names = [", ".join(domains[k] for k in torch.nonzero(row).flatten().tolist()) or "-"
                 for row in ref_labels.cpu()]
    top = labelled(zoomed(latent_rows), f"latent-guided: each source to each domain{at}",
                   ["source"] + list(domains), cell, pad * zoom)
    bottom = labelled(zoomed(ref_rows), "reference-guided: each source in each reference's style",
                      ["source"] + [f"ref: {name}" for name in ref_names], cell, pad * zoom,
                      row_label="references")
    sheet = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height + 8), "white")
    sheet.paste(top, (0, 0))
    sheet.paste(bottom, (0, top.height + 8))
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path
