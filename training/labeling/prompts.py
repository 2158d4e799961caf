"""Domain and base text features from prompt templates, fixed or learnable (CoOp-style).

A domain text ("blond hair") is inserted into each of the templates of a set ("a photo of a face
with {}."); the domain feature is the L2-normalised mean of the L2-normalised template embeddings.
The base prompt of a template is the same sentence with no domain word (`base_prompt_of`: the
slot is removed, and so is a connector word left dangling before the final punctuation, so
"a photo of a face with {}." gives "a photo of a face."); the base feature is the normalised mean
over the templates. LANIT's adaptive threshold compares every image with it.

Prompt learning (LANIT stage 2, after CoOp): with `learnable=True` the token embeddings of every
template's own words (its *context*) become one `nn.Parameter` `context` [C, W], initialised from
the frozen token embeddings of those words. Domain-name tokens and special tokens (start/end, CLS/SEP,
padding) stay frozen. The base prompt of a template is exactly its context tokens, so it shares
the learnable vectors and the adaptive threshold moves with them. Features are computed by running
the text tower on token embeddings (`VisionLanguage.encode_token_embeddings`), so with no update
they equal the frozen `encode_texts` features.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

TEMPLATE_SETS: dict[str, list[str]] = {
    # Photos of people: domain texts are attributes ("blond hair", "smiling", "eyeglasses").
    "face": [
        "a photo of a face with {}.",
        "a close-up photo of a person with {}.",
        "a portrait of someone with {}.",
        "a cropped photo of a face with {}.",
        "a headshot of a person with {}.",
        "a good photo of a face with {}.",
        "a blurry photo of a face with {}.",
        "a picture of a human face with {}.",
        "a frontal portrait showing {}.",
    ],
    # Animal faces: domain texts are species or breeds ("cat", "golden retriever").
    "animal": [
        "a photo of a {} face.",
        "a close-up photo of a {} face.",
        "a cropped photo of a {} head.",
        "a portrait of the {} animal.",
        "a bright photo of the {} face.",
        "a blurry photo of the {} face.",
        "a snapshot of a {} pet.",
        "a zoomed-in photo of the face of the {} animal.",
        "a frontal view of a {} head.",
    ],
    # Emoji and icons: domain texts are attributes or subjects ("red hair", "beard", "cat face").
    "emoji": [
        "a cute {} emoji.",
        "an emoji of {}.",
        "a flat cartoon icon of {}.",
        "a colorful emoji showing {}.",
        "a small vector drawing of {}.",
        "the {} emoji icon.",
        "a cartoon illustration with {}.",
        "an emoji character with {}.",
        "a simple graphic of {}.",
    ],
}
DEFAULT_TEMPLATE_SET = "face"
SLOT = "{}"
# Words that only make sense with the domain text after them ("a face with {}." -> "a face.").
_CONNECTORS = {"with", "of", "showing", "has", "having", "wearing"}


def base_prompt_of(template: str) -> str:
    """The template with its domain slot (and a connector word dangling before it) removed."""
    check_template(template)
    before, after = template.split(SLOT)
    if not after.strip(" .,;:!?"):
        words = before.split()
        if words and words[-1].lower() in _CONNECTORS:
            before = " ".join(words[:-1])
    text = " ".join(f"{before} {after}".split())
    return re.sub(r"\s+([.,;:!?])", r"\1", text)


def check_template(template: str) -> None:
    if not isinstance(template, str) or template.count(SLOT) != 1:
        raise ValueError(f"a prompt template needs exactly one '{{}}' slot, got {template!r}")


def resolve_templates(templates: str | Sequence[str] | None) -> list[str]:
    """None -> the default set; a set name -> that set; else the given list (validated)."""
    if templates is None:
        templates = DEFAULT_TEMPLATE_SET
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[templates])
        if SLOT not in templates:
            raise ValueError(f"unknown template set {templates!r}; known: {sorted(TEMPLATE_SETS)}")
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise ValueError("at least one prompt template is needed")
    for t in templates:
        check_template(t)
    return templates


def check_distinct_domains(domain_feats: torch.Tensor, domains: Sequence[str]) -> None:
    """ValueError when two domain texts get the same text features [D, E]: the labeler cannot tell
    them apart (text towers lower-case their input and cut it at their token limit), so they would
    be one domain trained twice under two names."""
    feats = F.normalize(domain_feats.detach().float(), dim=-1)
    same = (feats @ feats.t()).triu(diagonal=1) > 1 - 1e-6
    if bool(same.any()):
        i, j = (int(k) for k in torch.nonzero(same)[0])
        raise ValueError(f"the domain texts {domains[i]!r} and {domains[j]!r} get the same text features "
                         "from this labeler (text towers lower-case text and cut it at their token "
                         "limit); name them so that they differ")


def _normalized_mean(feats: torch.Tensor) -> torch.Tensor:
    """[..., T, E] normalised per template -> [..., E] normalised mean."""
    return F.normalize(F.normalize(feats, dim=-1).mean(dim=-2), dim=-1)


class PromptBank(nn.Module):
    """Domain features [D, E] and the base feature [E] of a list of domain texts.

    `forward() -> (domain_feats [D, E], base_feat [E])`, both L2-normalised fp32.

    - `templates`: a TEMPLATE_SETS name, a list of templates with one "{}" each, or None (the
      "face" set).
    - `base_prompt`: None (derived from each template, shares the learnable context), or a text
      (or list of texts) used as the base instead; an explicit base is always frozen.
    - `learnable=False`: features computed once (no gradient) and returned from then on.
      `learnable=True`: `self.context` [C, W] is the only parameter; forward runs the text tower
      with gradients. Under `torch.no_grad()` the result is reused until `context` changes.

    The vision-language model is held by reference, not as a submodule: `state_dict()` holds only
    `context` (learnable) or nothing, and `.parameters()` yields only `context`. Create the bank
    on the model's device; `.to()` moves the bank's own tensors.
    """

    def __init__(self, vl, domains: Sequence[str], templates: str | Sequence[str] | None = None,
                 base_prompt: str | Sequence[str] | None = None, learnable: bool = False) -> None:
        super().__init__()
        self._vl = (vl,)  # a tuple keeps nn.Module from registering the frozen model
        self.domains = [str(d) for d in domains]
        if not self.domains or any(not d.strip() for d in self.domains):
            raise ValueError(f"domain texts must be non-empty, got {self.domains}")
        self.templates = resolve_templates(templates)
        self.learnable = bool(learnable)
        self.domain_prompts = [[t.replace(SLOT, d) for t in self.templates] for d in self.domains]
        self.derived_base = base_prompt is None
        if base_prompt is None:
            self.base_prompts = [base_prompt_of(t) for t in self.templates]
        else:
            self.base_prompts = [base_prompt] if isinstance(base_prompt, str) else list(base_prompt)
            if not self.base_prompts or any(not str(b).strip() for b in self.base_prompts):
                raise ValueError(f"base prompt must be non-empty text, got {base_prompt!r}")
        self._cache: tuple | None = None
        if self.learnable:
            self._build_learnable()
        else:
            with torch.no_grad():
                domain_feats, base_feat = self._encode_frozen()
            self.register_buffer("domain_feats", domain_feats, persistent=False)
            self.register_buffer("base_feat", base_feat, persistent=False)

    @property
    def vl(self):
        return self._vl[0]

    def extra_repr(self) -> str:
        return (f"domains={len(self.domains)}, templates={len(self.templates)}, learnable={self.learnable}, "
                f"derived_base={self.derived_base}")

    def _encode_frozen(self) -> tuple[torch.Tensor, torch.Tensor]:
        D, T = len(self.domains), len(self.templates)
        texts = [p for row in self.domain_prompts for p in row] + self.base_prompts
        feats = self.vl.encode_texts(texts)  # [D * T + B, E]
        domain_feats = _normalized_mean(feats[:D * T].view(D, T, -1))
        base_feat = _normalized_mean(feats[D * T:])
        return domain_feats, base_feat

    # -- learnable context ---------------------------------------------------------------

    def _build_learnable(self) -> None:
        vl = self.vl
        empty = vl.tokenize([""])[0]
        pad_id = int(empty[-1])
        specials = set(empty[:_length(empty, pad_id)].tolist())
        context_length = empty.shape[0]
        D, T = len(self.domains), len(self.templates)
        template_bases = [base_prompt_of(t) for t in self.templates]
        base_ids = vl.tokenize(template_bases)  # [T, L]
        domain_ids = vl.tokenize([p for row in self.domain_prompts for p in row])  # [D * T, L]
        for ids, text in zip(torch.cat([base_ids, domain_ids]), template_bases + sum(self.domain_prompts, [])):
            if _length(ids, pad_id) >= context_length:
                raise ValueError(f"prompt {text!r} does not fit the text tower's {context_length} tokens")

        if vl.padding_is_inert:
            # Trailing padding changes nothing: cut every prompt after the longest one (~3x less work).
            longest = max(_length(ids, pad_id) for ids in torch.cat([base_ids, domain_ids]))
            context_length = longest
            base_ids, domain_ids = base_ids[:, :longest], domain_ids[:, :longest]

        # Context of template t: its base prompt's non-special tokens.
        ctx_positions, offsets = [], [0]
        for t in range(T):
            b = base_ids[t]
            pos = [j for j in range(_length(b, pad_id)) if int(b[j]) not in specials]
            if not pos:
                raise ValueError(f"template {self.templates[t]!r} has no context words to learn")
            ctx_positions.append(pos)
            offsets.append(offsets[-1] + len(pos))
        with torch.no_grad():
            base_embeds = vl.embed_tokens(base_ids).float()  # [T, L, W]
            context = torch.cat([base_embeds[t, pos] for t, pos in enumerate(ctx_positions)])  # [C, W]

        # Where each context vector goes in every prompt: the domain prompt of (d, t) is the base
        # prompt of t with the domain tokens inserted at one place.
        flat_pos, src = [], []
        for d in range(D):
            for t in range(T):
                row = d * T + t
                where = _insertion(domain_ids[row].tolist(), base_ids[t].tolist(), pad_id,
                                   self.domain_prompts[d][t], template_bases[t])
                for i, j in enumerate(ctx_positions[t]):
                    flat_pos.append(row * context_length + where(j))
                    src.append(offsets[t] + i)
        ids = domain_ids
        if self.derived_base:
            for t in range(T):
                row = D * T + t
                for i, j in enumerate(ctx_positions[t]):
                    flat_pos.append(row * context_length + j)
                    src.append(offsets[t] + i)
            ids = torch.cat([domain_ids, base_ids])
        else:
            with torch.no_grad():
                self.register_buffer("fixed_base_feat", _normalized_mean(vl.encode_texts(self.base_prompts)),
                                     persistent=False)
        with torch.no_grad():
            frozen = vl.embed_tokens(ids).float()  # [P, L, W]
        self.context = nn.Parameter(context.clone())
        self.register_buffer("prompt_ids", ids, persistent=False)
        self.register_buffer("frozen_embeds", frozen, persistent=False)
        self.register_buffer("context_slots", torch.tensor(flat_pos, dtype=torch.long, device=ids.device),
                             persistent=False)
        self.register_buffer("context_index", torch.tensor(src, dtype=torch.long, device=ids.device),
                             persistent=False)

    def prompt_embeddings(self) -> torch.Tensor:
        """Token embeddings [P, L, W] of every prompt with the current context vectors."""
        P, L, W = self.frozen_embeds.shape
        flat = self.frozen_embeds.reshape(P * L, W)
        flat = flat.index_copy(0, self.context_slots, self.context[self.context_index].to(flat.dtype))
        return flat.view(P, L, W)

    def _encode_learnable(self) -> tuple[torch.Tensor, torch.Tensor]:
        D, T = len(self.domains), len(self.templates)
        embeds = self.prompt_embeddings()
        feats = self.vl.encode_token_embeddings(embeds.to(self.vl.device), self.prompt_ids.to(self.vl.device))
        feats = feats.float().to(self.context.device)  # [P, E]
        domain_feats = _normalized_mean(feats[:D * T].view(D, T, -1))
        base_feat = _normalized_mean(feats[D * T:]) if self.derived_base else self.fixed_base_feat
        return domain_feats, base_feat

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.learnable:
            return self.domain_feats, self.base_feat
        if torch.is_grad_enabled():
            self._cache = None
            return self._encode_learnable()
        # Prompts unchanged since the last no-grad call (same tensor version): reuse the features.
        key = (self.context._version, self.context.data_ptr(), self.context.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._encode_learnable())
        return self._cache[1]

    def _apply(self, fn, recurse=True):
        self._cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        return super()._load_from_state_dict(*args, **kwargs)


def _length(ids: torch.Tensor, pad_id: int) -> int:
    """Number of tokens up to the last non-padding one."""
    keep = torch.nonzero(ids != pad_id).flatten()
    return int(keep[-1]) + 1 if len(keep) else 0


def _insertion(full: list[int], base: list[int], pad_id: int, full_text: str, base_text: str):
    """Map base-prompt positions to positions in `full` = base with one contiguous insertion."""
    nf = _length(torch.tensor(full), pad_id)
    nb = _length(torch.tensor(base), pad_id)
    k = nf - nb
    if k <= 0:
        raise ValueError(f"prompt {full_text!r} has no tokens beyond its base {base_text!r}")
    p = 0
    while p < nb and full[p] == base[p]:
        p += 1
    while p >= 0 and full[p + k:nf] != base[p:nb]:
        p -= 1
    if p < 0 or full[:p] != base[:p]:
        raise ValueError(f"prompt {full_text!r} is not its base {base_text!r} with the domain text "
                         "inserted at one place (tokenizer merged tokens across the slot)")
    return lambda j: j if j < p else j + k
