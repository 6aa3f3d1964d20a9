"""``MonkeyProcessor``: a tokenizer and the image tiling in one object, as transformers processors are.

``processor(text=[...], images=[...], return_tensors="pt")`` returns exactly the keyword
arguments :meth:`MonkeyForCausalLM.forward` and :meth:`~MonkeyForCausalLM.generate` take::

    input_ids       [B, T]      left-padded with the tokenizer's pad id (generation appends on the right)
    attention_mask  [B, T]      1 for real tokens, 0 for padding
    pixel_values    [N, 3, S, S] every view of every image, in order of appearance (absent without images)
    view_slots      [N]         adapter slot per view (window k -> k, global view -> -1)

so ``model.generate(**processor(...), max_new_tokens=...)`` works. Images are named in the text
in either of two ways:

* HF style: ``<image>`` placeholders, filled in order from ``images`` (PIL images or paths; a
  flat list over the whole batch, or one list per text);
* monkeytune's inline ``<img>path</img>``, read from disk (relative to ``image_root``).

The text is tokenized as plain text (special-token strings in it stay text, as in training);
pass ``template=`` (``vqa``, ``chatml`` ...; see :mod:`monkeytune.prompts`) to have each text
treated as a question and rendered in the prompt layout the model was trained with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from transformers import BatchFeature

from monkeytune.config import ModelConfig
from monkeytune.generate import default_template, prompt_ids, prompt_image_path
from monkeytune.model.io import ModelFolderError, folder_config, folder_kind, load_tokenizer_if_any, read_config
from monkeytune.tokenizer.base import encode_with_images
from monkeytune.vision.processor import ImageProcessor

IMAGE_PLACEHOLDER = "<image>"
# An image given as an object travels through the ``<img>...</img>`` syntax under this marker
# (a NUL cannot occur in a path), so both ways of naming images share one tokenizer path.
_OBJECT_MARK = "\x00image:"


class MonkeyProcessor:
    """Tokenizer plus :class:`~monkeytune.vision.processor.ImageProcessor` of one model.

    Args:
        tokenizer: A monkeytune tokenizer (:class:`~monkeytune.tokenizer.base.Tokenizer`).
        config: The model's :class:`~monkeytune.config.ModelConfig` (view layout, visual tokens
            per image).
        template: Default prompt template for ``template="auto"`` (the folder's recorded one).
    """

    def __init__(self, tokenizer: Any, config: ModelConfig, template: str | None = None):
        config.check_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.config = config
        self.image_processor = ImageProcessor(config.image)
        self.template = template

    @classmethod
    def from_pretrained(cls, directory: str | Path, **ignored: Any) -> "MonkeyProcessor":
        """The processor of a monkeytune or official model folder (tokenizer, view layout, template).

        Raises:
            ModelFolderError: no model folder, or one without tokenizer files.
        """
        config = folder_config(directory)
        tokenizer = load_tokenizer_if_any(directory)
        if tokenizer is None:
            raise ModelFolderError(f"{directory} has no tokenizer files (qwen.tiktoken or tokenizer.json)")
        meta = dict(read_config(directory).get("metadata") or {}) if folder_kind(directory) == "monkeytune" else {}
        return cls(tokenizer, config, template=default_template(meta, str(directory)))

    # ------------------------------------------------------------------ encoding
    def __call__(
        self,
        text: str | Sequence[str],
        images: Any = None,
        return_tensors: str | None = "pt",
        template: str | None = None,
        image_root: str | Path | None = None,
        **ignored: Any,
    ) -> BatchFeature:
        """Encode a batch of prompts and their images.

        Args:
            text: One prompt or a list of prompts.
            images: For ``<image>`` placeholders: a flat list in order over the batch, or one
                list per prompt; each a PIL image or a path. A prompt without placeholders and a
                ``template`` takes its (single) image where the template puts it.
            return_tensors: ``"pt"`` (the only kind; tensors are what the model takes).
            template: None: each text is the prompt as written. A template name, or ``"auto"``
                for the folder's own: each text is a question rendered in that layout.
            image_root: Folder relative ``<img>path</img>`` paths are read from.

        Returns:
            A ``BatchFeature`` with ``input_ids``, ``attention_mask`` and, with images,
            ``pixel_values`` and ``view_slots`` (see the module docstring).

        Raises:
            ValueError: placeholders and images do not match in number, an unknown template or
                a tensor type other than ``pt``.
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text is empty: give at least one prompt")
        per_text = _split_images(images, texts)
        template = (self.template or "vqa") if template == "auto" else template
        rows: list[list[int]] = []
        sources: list[Any] = []
        for i, (prompt, imgs) in enumerate(zip(texts, per_text)):
            ids, paths = self._encode_one(i, prompt, imgs, template)
            rows.append(ids)
            sources += [imgs[int(p[len(_OBJECT_MARK):])] if p.startswith(_OBJECT_MARK)
                        else prompt_image_path(p, image_root) for p in paths]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):
            if ids:  # left padding: generation appends on the right
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
        data: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": mask}
        if sources:
            data["pixel_values"], data["view_slots"] = self.image_processor.batch(sources)
        return BatchFeature(data=data)

    def _encode_one(self, index: int, prompt: str, imgs: list[Any], template: str | None) -> tuple[list[int], list[str]]:
        """Token ids and image references (paths, or object markers) of one prompt."""
        if not isinstance(prompt, str):
            raise TypeError(f"text[{index}] is {type(prompt).__name__}, not a string")
        n_placeholders = prompt.count(IMAGE_PLACEHOLDER)
        marked = prompt
        for k in range(n_placeholders):
            marked = marked.replace(IMAGE_PLACEHOLDER, f"<img>{_OBJECT_MARK}{k}</img>", 1)
        image = None
        if template is not None and n_placeholders == 0 and len(imgs) == 1:
            image, n_placeholders = f"{_OBJECT_MARK}0", 1  # the template places it
        if n_placeholders != len(imgs):
            raise ValueError(f"text[{index}] has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders but "
                             f"{len(imgs)} images were given for it")
        if template is None:
            return encode_with_images(self.tokenizer, marked, self.config.tokens_per_image)
        return prompt_ids(template, self.tokenizer, self.config.tokens_per_image, marked, image)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one row of ids (e.g. ``model.generate``'s output, which holds only new tokens).

        With ``skip_special_tokens`` the control tokens are dropped, and so are ids past the
        tokenizer's vocabulary (the rows an embedding table is padded with carry no text).
        """
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.tokenizer.vocab_size]
        return self.tokenizer.decode(list(ids), skip_special=skip_special_tokens)

    def batch_decode(self, rows: Any, skip_special_tokens: bool = True) -> list[str]:
        """:meth:`decode` of every row."""
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]


def _split_images(images: Any, texts: list[str]) -> list[list[Any]]:
    """Images per text: a nested list is taken as is; a flat one is dealt out by placeholder count."""
    if images is None:
        return [[] for _ in texts]
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    images = list(images)
    if images and all(isinstance(x, (list, tuple)) for x in images):
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} image lists for {len(texts)} texts")
        return [list(x) for x in images]
    counts = [t.count(IMAGE_PLACEHOLDER) for t in texts]
    if sum(counts) == 0 and len(images) == len(texts):
        return [[x] for x in images]  # one image per question, placed by the template
    if sum(counts) != len(images):
        raise ValueError(f"the texts hold {sum(counts)} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images were given")
    out, pos = [], 0
    for n in counts:
        out.append(images[pos:pos + n])
        pos += n
    return out

