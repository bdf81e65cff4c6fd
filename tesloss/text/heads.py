"""A text head from class names and an encoder, and its file: build_text_head averages
each class's prompt embeddings (the CLIP zero-shot recipe); save_text_head and
load_text_head write and read it as safetensors with what it was built from, so that a
head is never used with other class names."""
import hashlib
import json
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .encoders import TextEncoder, _optional

__all__ = ["DEFAULT_TEMPLATES", "build_text_head", "load_text_head", "save_text_head"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)
FORMAT = "tesloss.text_head.v1"
TENSOR_KEY = "text_head"
# Below this many classes a bar would flash by; above it, encoding takes long enough to watch.
PROGRESS_MIN_CLASSES = 100


def _nonempty_list(caller, name, value, expected, item):
    # A str is a sequence too, and would silently become one entry per character.
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{caller}: {name} must be {expected}, got {type(value).__name__}")
    items = list(value)
    if not items:
        raise ValueError(f"{caller}: {name} must hold at least one {item}, got none")
    return items


def _check_classnames(caller, classnames):
    names = _nonempty_list(caller, "classnames", classnames, "a sequence of str", "class name")
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{caller}: classnames[{index}] must be a non-empty str, "
                             f"got {name!r}")
    return names


def _check_templates(caller, templates):
    templates = _nonempty_list(caller, "templates", templates,
                               f"a sequence of str such as {DEFAULT_TEMPLATES}", "template")
    for index, template in enumerate(templates):
        # Strings only: they are saved as metadata, which a callable could not be.
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(f"{caller}: templates[{index}] must be a str with a '{{}}' where "
                             f"the class name goes, got {template!r}")
    return templates


def build_text_head(encoder: TextEncoder, classnames: Sequence[str],
                    templates: Sequence[str] = DEFAULT_TEMPLATES, *, batch_size: int = 256,
                    progress: Optional[bool] = None) -> torch.Tensor:
    """Embeds every class name in every template and returns the normalized class rows.

    Underscores in class names become spaces (``"pickup_truck"`` is read ``"pickup truck"``).
    With several templates, each prompt's embedding is normalized, the class's embeddings are
    averaged, and the average is normalized again. For an :class:`OpenCLIPTextEncoder` the
    result equals ``open_clip.build_zero_shot_classifier(model, tokenizer, names,
    templates).T`` where ``names`` have their underscores replaced.

    Args:
        encoder: a :class:`TextEncoder` (see :func:`encoder_from_spec`).
        classnames: the C class names, in label order.
        templates: format strings with one ``{}``.
        batch_size: prompts per forward pass of the encoder.
        progress: show a tqdm bar; None shows one for 100 classes or more.

    Returns:
        A float32 CPU tensor [C, D] with unit rows.
    """
    if not isinstance(encoder, TextEncoder):
        raise TypeError(f"build_text_head: encoder must be a tesloss.text.TextEncoder (e.g. "
                        f"OpenCLIPTextEncoder), got {type(encoder).__name__}")
    names = _check_classnames("build_text_head", classnames)
    templates = _check_templates("build_text_head", templates)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"build_text_head: batch_size must be an int >= 1, got {batch_size!r}")
    if progress is None:
        progress = len(names) >= PROGRESS_MIN_CLASSES
    tqdm = _optional("tqdm", "build_text_head").tqdm

    classes_per_batch = max(1, batch_size // len(templates))
    rows = []
    with tqdm(total=len(names), unit="class", desc="text head", disable=not progress) as bar:
        for start in range(0, len(names), classes_per_batch):
            chunk = names[start:start + classes_per_batch]
            prompts = [template.format(name.replace("_", " ")) for name in chunk
                       for template in templates]
            embeddings = encoder.encode(prompts)
            if (not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2
                    or embeddings.shape[0] != len(prompts)):
                shape = list(getattr(embeddings, "shape", [])) or type(embeddings).__name__
                raise ValueError(f"build_text_head: {encoder!r}.encode must return a tensor "
                                 f"[{len(prompts)}, D] for {len(prompts)} prompts, got {shape}")
            # fp32 before normalizing: an fp16 encoder's average would otherwise be rounded.
            embeddings = F.normalize(embeddings.float(), dim=-1)
            class_rows = embeddings.reshape(len(chunk), len(templates), -1).mean(dim=1)
            rows.append(F.normalize(class_rows, dim=-1).cpu())
            bar.update(len(chunk))
    return torch.cat(rows).contiguous()


def _names_sha256(names):
    return hashlib.sha256(json.dumps(names, ensure_ascii=False).encode()).hexdigest()


def save_text_head(path: Union[str, os.PathLike], head: torch.Tensor, *,
                   classnames: Sequence[str], templates: Sequence[str],
                   encoder: Union[TextEncoder, str]) -> None:
    """Writes a text head to a safetensors file, with what made it as metadata.

    The metadata holds the encoder's spec and a SHA-256 of its text weights, the templates, the
    class names and their SHA-256, C, D and the library versions. The tensor is stored as it
    is, so :func:`load_text_head` returns it bit for bit. The file is written to a temporary
    name first and then renamed, so a reader never sees half a file.

    Args:
        path: the file to write.
        head: the [C, D] tensor from :func:`build_text_head`.
        classnames: the C class names it was built from, in label order.
        templates: the templates it was built with.
        encoder: the :class:`TextEncoder` it was built with, or a str describing it.
    """
    save_file = _optional("safetensors.torch", "save_text_head", "safetensors").save_file

    names = _check_classnames("save_text_head", classnames)
    templates = _check_templates("save_text_head", templates)
    if not isinstance(head, torch.Tensor) or not head.is_floating_point() or head.dim() != 2:
        got = (f"{head.dtype} of shape {list(head.shape)}" if isinstance(head, torch.Tensor)
               else type(head).__name__)
        raise TypeError(f"save_text_head: head must be a floating-point tensor [C, D], got {got}")
    if head.shape[0] != len(names):
        raise ValueError(f"save_text_head: head has C={head.shape[0]} rows but classnames has "
                         f"{len(names)} names")
    if isinstance(encoder, TextEncoder):
        spec, weights, versions = encoder.spec, encoder.weights_sha256(), encoder.library_versions()
    elif isinstance(encoder, str) and encoder:
        spec, weights, versions = encoder, "", {}
    else:
        raise TypeError(f"save_text_head: encoder must be a tesloss.text.TextEncoder or a "
                        f"non-empty str, got {encoder!r}")
    import safetensors

    from .. import __version__

    versions = {"tesloss": __version__, "torch": torch.__version__,
                "safetensors": safetensors.__version__, **versions}
    metadata = {
        "format": FORMAT,
        "encoder": spec,
        "encoder_weights_sha256": weights,
        "templates": json.dumps(templates, ensure_ascii=False),
        "classnames": json.dumps(names, ensure_ascii=False),
        "classnames_sha256": _names_sha256(names),
        "num_classes": str(head.shape[0]),
        "dim": str(head.shape[1]),
        "versions": json.dumps(versions),
    }
    path = os.fspath(path)
    partial = f"{path}.partial-{os.getpid()}"
    try:
        save_file({TENSOR_KEY: head.detach().cpu().contiguous()}, partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def load_text_head(path: Union[str, os.PathLike], *, classnames: Optional[Sequence[str]] = None,
                   return_metadata: bool = False,
                   ) -> Union[torch.Tensor, tuple[torch.Tensor, dict]]:
    """Reads a text head written by :func:`save_text_head`.

    Args:
        path: the safetensors file.
        classnames: when given, the class names the caller trains with; a head built from
            other names, or from the same names in another order, is refused with a
            ValueError that shows where they differ.
        return_metadata: also return the metadata as a dict (``encoder``,
            ``encoder_weights_sha256``, ``templates``, ``classnames``, ``classnames_sha256``,
            ``num_classes``, ``dim``, ``versions``, ``format``).

    Returns:
        The [C, D] tensor on the CPU, exactly as saved; with ``return_metadata``,
        ``(head, metadata)``.
    """
    safe_open = _optional("safetensors", "load_text_head").safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_text_head: no such file: {path}")
    with safe_open(path, framework="pt") as file:
        raw = file.metadata() or {}
        if raw.get("format") != FORMAT or TENSOR_KEY not in file.keys():
            raise ValueError(f"load_text_head: {path} is not a text head written by "
                             f"tesloss.save_text_head (format {raw.get('format')!r}, expected "
                             f"{FORMAT!r})")
        head = file.get_tensor(TENSOR_KEY)
    metadata = dict(raw)
    for key in ("templates", "classnames", "versions"):
        metadata[key] = json.loads(raw[key])
    metadata["num_classes"], metadata["dim"] = int(raw["num_classes"]), int(raw["dim"])
    if list(head.shape) != [metadata["num_classes"], metadata["dim"]]:
        raise ValueError(f"load_text_head: {path} is corrupt: its metadata says "
                         f"[{metadata['num_classes']}, {metadata['dim']}] but the tensor is "
                         f"{list(head.shape)}")
    if classnames is not None:
        names = _check_classnames("load_text_head", classnames)
        if _names_sha256(names) != raw["classnames_sha256"]:
            raise ValueError(f"load_text_head: {path} was built for other class names than "
                             f"the classnames given: "
                             f"{_describe_difference(metadata['classnames'], names)}; "
                             f"rebuild it with build_text_head for these classes")
    return (head, metadata) if return_metadata else head


def _describe_difference(saved, given, most=5):
    if sorted(saved) == sorted(given):
        return f"the same {len(saved)} names in another order, which would permute the labels"
    parts = []
    if len(saved) != len(given):
        parts.append(f"the file has {len(saved)} names, classnames has {len(given)}")
    saved_set, given_set = set(saved), set(given)
    only_saved = [name for name in saved if name not in given_set]
    only_given = [name for name in given if name not in saved_set]
    if only_given:
        parts.append(f"not in the file: {_shorten(only_given, most)}")
    if only_saved:
        parts.append(f"only in the file: {_shorten(only_saved, most)}")
    if not only_given and not only_saved:
        mismatched = [f"[{index}] {a!r} vs {b!r}" for index, (a, b)
                      in enumerate(zip(saved, given)) if a != b]
        parts.append(f"file vs classnames at {_shorten(mismatched, most, quote=False)}")
    return "; ".join(parts)


def _shorten(items, most, quote=True):
    shown = ", ".join(repr(item) if quote else item for item in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")
