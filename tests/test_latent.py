"""Autoencoders and latent diffusion on real MNIST (tiny sizes, CPU): the nets, the training run's
reconstructions and latent-space picture, a latent run that needs nothing but its own checkpoint,
and the one-line refusals of an autoencoder that will not do."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.__main__ import main
from diffusion.config import ConfigError, validate_run
from diffusion.methods import build_method
from diffusion.nets.autoencoder import ConvAutoencoder, MLPAutoencoder
from diffusion.nets.mlp import FiLMMLP
from diffusion.scores.latents import latent_space_report
from diffusion.train import train
from diffusion.trained import TrainedModel, file_sha256, inspect_checkpoint
from tests.conftest import REPO, assert_resumes_bitwise

COMMON = {
    "device": "cpu",
    "data": {"dataset": "mnist", "download": False, "subset": 128},
    "train": {
        "batch_size": 32,
        "max_steps": 6,
        "log_every": 1,
        "sample_every_epochs": None,
        "checkpoint_every_steps": None,
        "checkpoint_every_minutes": None,
        "progress": "lines",
    },
    "sample": {"num_inference_steps": 4, "num_samples": 8},
    "eval": {"num_samples": 60},
}
MLP_AE = {"name": "mlp_autoencoder", "latent_dim": 6, "hidden_dim": 32, "num_layers": 1}
CONV_AE = {
    "name": "conv_autoencoder",
    "base_channels": 8,
    "channel_mults": [1, 2],
    "latent_channels": 2,
    "norm_groups": 4,
}


def config_of(mnist_root, model: dict, method: dict, **sections):
    raw = json.loads(json.dumps(COMMON))
    raw["data"]["root"] = str(mnist_root)
    for name, values in sections.items():
        raw[name] = raw.get(name, {}) | values
    return validate_run(raw | {"model": model, "method": method})


def latent_config(mnist_root, autoencoder: str, net: str = "mlp", method: dict | None = None, **sections):
    model = {"name": net, "hidden_dim": 32, "num_layers": 2, "class_conditional": True}
    if net == "unet":
        model |= {
            "base_channels": 8,
            "channel_mults": [1, 2],
            "num_res_blocks": 1,
            "attention": False,
            "norm_groups": 4,
        }
    settings = {"name": "ddpm", "autoencoder": autoencoder, "clip_sample": False, "num_train_timesteps": 50}
    return config_of(mnist_root, model, settings | (method or {}), **sections)


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory):
    """An MLP and a conv autoencoder, each trained 6 steps on 128 MNIST digits."""
    import os
    from pathlib import Path

    root = os.environ.get("DIFFUSION_DATA_ROOT")
    if not root or not (Path(root) / "MNIST/raw/train-images-idx3-ubyte").is_file():
        pytest.skip("set DIFFUSION_DATA_ROOT to a folder holding MNIST/raw/ (see README)")
    folder = tmp_path_factory.mktemp("autoencoders")
    runs = {}
    for name, model in (("mlp", MLP_AE), ("conv", CONV_AE)):
        config = config_of(Path(root), model, {"name": "autoencoder"}, sample={"num_samples": 16})
        assert train(config, folder / name) == 0
        runs[name] = folder / name
    return runs


def test_autoencoders_map_images_to_latents_and_back_in_0_1():
    for shape in ((1, 28, 28), (3, 32, 32), (1, 7, 9)):
        images = torch.rand(3, *shape) * 2 - 1
        for net, latent_shape in (
            (MLPAutoencoder(shape, latent_dim=5, hidden_dim=16), (5,)),
            (ConvAutoencoder(shape, latent_channels=3, base_channels=8, channel_mults=(1, 2), norm_groups=4), None),
        ):
            latents = net.encode(images)
            expected = latent_shape or (3, (shape[1] + 3) // 4, (shape[2] + 3) // 4)
            assert latents.shape == (3, *expected) == (3, *net.latent_shape)
            decoded = net.decode(latents)
            assert decoded.shape == images.shape and 0 <= decoded.min() and decoded.max() <= 1
            assert torch.allclose(torch.sigmoid(net(images)), decoded)  # forward: the logits


def test_film_mlp_conditions_on_time_and_class_and_starts_unconditioned():
    net = FiLMMLP(6, hidden_dim=32, num_layers=2, num_classes=10)
    x = torch.randn(4, 6)
    t, labels = torch.tensor([1, 1, 1, 1]), torch.tensor([0, 0, 0, 0])
    base = net(x, t, labels)
    assert base.shape == (4, 6)
    # FiLM starts at zero: time and class have no say until trained.
    assert torch.equal(net(x, t * 700, labels + 3), base)
    for block in net.blocks:
        torch.nn.init.normal_(block.film.weight)
    moved = net(x, t, labels)
    assert not torch.allclose(net(x, t * 700, labels), moved)
    assert not torch.allclose(net(x, t, labels + 3), moved)
    assert torch.equal(net(x, t, None), net(x, t, torch.full_like(labels, 10)))  # None: the null class


def test_the_latent_report_scores_separated_classes_high_and_mixed_ones_near_zero(tmp_path):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    separated = latent_space_report(
        centres[labels] + torch.randn(300, 4, generator=generator), labels, tmp_path / "a.png"
    )
    mixed = latent_space_report(torch.randn(300, 4, generator=generator), labels, tmp_path / "b.png")
    assert separated["silhouette"] > 0.8 and abs(mixed["silhouette"]) < 0.05
    assert separated["calinski_harabasz"] > 100 * mixed["calinski_harabasz"]
    with Image.open(tmp_path / "a.png") as image:
        assert image.format == "PNG" and image.size[0] > 2 * image.size[1] * 0.8  # PCA beside t-SNE
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # coloured points, not a blank canvas


def test_an_autoencoder_run_writes_reconstructions_and_its_latent_space(autoencoders, mnist_root):
    for name, run_dir in autoencoders.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        space = summary["scores"]["latent_space"]
        assert space["num_points"] == 60 and -1 <= space["silhouette"] <= 1 and space["calinski_harabasz"] > 0
        assert space["latent_dim"] == (6 if name == "mlp" else 2 * 7 * 7)
        assert (run_dir / "figures/latent_space.png").stat().st_size > 10_000
        # The preview: rows of originals (the first training images), each followed by their reconstructions.
        with Image.open(run_dir / "samples/final.png") as image:
            grid = np.asarray(image.convert("L")).astype(float)
        trained = TrainedModel(run_dir / "checkpoints/latest.pt", use_ema=True, device=torch.device("cpu"))
        examples = torch.from_numpy(
            np.stack([grid[2 + 30 * 0 : 2 + 30 * 0 + 28, 2 + 30 * i : 30 + 30 * i] for i in range(4)])
        )
        from diffusion.data import load_dataset

        dataset = load_dataset(trained.config.data, "train")
        first = (dataset.batch(torch.arange(4), torch.device("cpu"))["images"][:, 0] + 1) * 127.5
        assert (examples - first).abs().max() <= 1  # row 1: the originals, as saved
        reconstructed = torch.from_numpy(np.stack([grid[32:60, 2 + 30 * i : 30 + 30 * i] for i in range(4)]))
        expected = trained.model.decode(trained.model.encode(first[:, None] / 127.5 - 1))[:, 0] * 255
        assert (reconstructed - expected.detach()).abs().max() <= 1  # row 2: their reconstructions


def test_an_autoencoder_is_not_sampled_in_one_line(autoencoders, capsys):
    for task in ("sample", "eval"):
        assert main([task, str(autoencoders["mlp"])]) == 2
        error = capsys.readouterr().err
        assert f"task: '{task}' is not allowed with an autoencoder" in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("kind, net", [("mlp", "mlp"), ("conv", "unet")])
def test_latent_diffusion_needs_nothing_but_its_own_run(autoencoders, mnist_root, tmp_path, kind, net):
    """The autoencoder's type and weights come from its checkpoint, the scale is measured and
    kept; then, with the autoencoder's run gone, the latent run resumes bitwise and samples."""
    source = tmp_path / "autoencoder"
    shutil.copytree(autoencoders[kind], source)
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    config = latent_config(mnist_root, str(source), net)
    assert train(config, whole) == 0
    assert train(config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 3})}), halves) == 0

    checkpoint = torch.load(halves / "checkpoints/latest.pt", weights_only=False)
    parent = checkpoint["parent"]
    assert parent["config"]["model"]["name"] == f"{kind}_autoencoder"
    assert parent["sha256"] == file_sha256(source / "checkpoints/latest.pt") and parent["reference"] == str(source)
    autoencoder = torch.load(source / "checkpoints/latest.pt", weights_only=False)
    for key, tensor in autoencoder["ema"].items():  # frozen: the autoencoder's EMA weights, unchanged
        assert torch.equal(checkpoint["model"][f"autoencoder.{key}"], tensor), key
    from diffusion.data import load_dataset

    first = load_dataset(config.data).batch(torch.arange(128), torch.device("cpu"))["images"]  # all 128: < 256
    trained_ae = TrainedModel(source / "checkpoints/latest.pt", use_ema=True, device=torch.device("cpu"))
    measured = trained_ae.model.encode(first).std()
    assert checkpoint["model"]["latent_std"] == pytest.approx(measured.item(), rel=1e-5)
    logged = [json.loads(line) for line in (halves / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["latent_std"] == pytest.approx(measured.item(), rel=1e-5)

    shutil.rmtree(source)  # resuming and sampling need only the latent run
    assert train(config, halves) == 0
    a = torch.load(whole / "checkpoints/latest.pt", weights_only=False)
    b = torch.load(halves / "checkpoints/latest.pt", weights_only=False)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert main(["sample", str(halves), "--set", "sample.guidance_scale=2", "--set", "sample.num_samples=10"]) == 0
    arrays = np.load(halves / "samples/latent-ddim4-w2-seed0.npz")
    assert arrays["images"].shape == (10, 1, 28, 28) and list(arrays["labels"]) == list(range(10))
    record = inspect_checkpoint(halves)
    assert record["parent"]["method"] == "autoencoder" and record["parent"]["net"] == f"{kind}_autoencoder"
    assert record["parent"]["sha256"] == parent["sha256"]


def test_a_missing_or_mismatched_autoencoder_is_refused_in_one_line_and_nothing_is_written(
    autoencoders, mnist_root, tmp_path
):
    pixel = config_of(
        mnist_root,
        {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention": False, "norm_groups": 4},
        {"num_train_timesteps": 50},
    )
    assert train(pixel, tmp_path / "pixel") == 0
    cases = [
        (str(tmp_path / "nowhere"), "method.autoencoder: '{ref}' is not allowed: no checkpoint there"),
        (str(tmp_path / "pixel"), "method.autoencoder: '{ref}' is not allowed: it is a 'ddpm' run, not an autoencoder"),
        ("run:autoencoder-mlp", "method.autoencoder: 'run:autoencoder-mlp' is not allowed: no checkpoint there"),
    ]
    for reference, message in cases:
        out = tmp_path / "latent"
        with pytest.raises(ConfigError) as error:
            train(latent_config(mnist_root, reference), out)
        assert str(error.value).startswith(message.format(ref=reference)) and "\n" not in str(error.value)
        assert not out.exists()
    # The conv autoencoder's latent grid needs the UNet; the MLP's vectors the MLP.
    for kind, net, says in (("conv", "mlp", "use unet"), ("mlp", "unet", "use mlp")):
        with pytest.raises(ConfigError, match=f"model.name: '{net}' is not allowed for latents of shape .*{says}"):
            train(latent_config(mnist_root, str(autoencoders[kind]), net), tmp_path / "latent")
        assert not (tmp_path / "latent").exists()


def test_an_autoencoder_of_other_images_is_refused(autoencoders, mnist_root, tmp_path):
    checkpoint = torch.load(autoencoders["mlp"] / "checkpoints/latest.pt", weights_only=False)
    checkpoint["data"]["image_shape"] = [3, 32, 32]
    checkpoint["config"]["data"]["dataset"] = "cifar10"
    torch.save(checkpoint, tmp_path / "cifar-ae.pt")
    with pytest.raises(ConfigError) as error:
        train(latent_config(mnist_root, str(tmp_path / "cifar-ae.pt")), tmp_path / "latent")
    assert "it encodes (3, 32, 32) images (cifar10), and this run trains on (1, 28, 28)" in str(error.value)


@pytest.mark.parametrize(
    "model, method, message",
    [
        ({"name": "unet"}, {"name": "autoencoder"}, "model.name: 'unet' is not allowed with method.name 'autoencoder'"),
        (
            {"name": "mlp_autoencoder"},
            {"name": "ddpm"},
            "model.name: 'mlp_autoencoder' is not allowed with method.name",
        ),
        (
            {"name": "mlp"},
            {"name": "ddpm"},
            "model.name: 'mlp' is not allowed with data.dataset 'mnist': use 'unet' or 'dit' (mlp takes an autoencoder's latent",
        ),
        (
            {"name": "mlp"},
            {"name": "ddpm", "autoencoder": "runs/ae"},
            "method.clip_sample: true is not allowed with method.autoencoder",
        ),
        (
            {"name": "mlp_autoencoder", "class_conditional": True},
            {"name": "autoencoder"},
            "model.class_conditional: true is not allowed with method.name 'autoencoder'",
        ),
        (
            {"name": "transformer"},
            {"name": "autoencoder"},
            "model.name: 'transformer' is not allowed with method.name 'autoencoder': use 'mlp_autoencoder' or "
            "'conv_autoencoder'",
        ),
        (
            {"name": "mlp"},
            {"autoencoder": "runs/ae", "clip_sample": False, "autoencoder_model": {"latent_dm": 4}},
            "method.autoencoder_model: {'latent_dm': 4} is not allowed: latent_dm: unknown key; did you mean "
            "'latent_dim'?",
        ),
        (
            {"name": "mlp"},
            {"autoencoder": "runs/ae", "clip_sample": False, "autoencoder_model": {"name": "unet"}},
            "method.autoencoder_model: {'name': 'unet'} is not allowed: name must be 'mlp_autoencoder' or "
            "'conv_autoencoder'",
        ),
        (
            {"name": "unet"},
            {"autoencoder_model": {"latent_dim": 4}},
            "method.autoencoder_model: {'latent_dim': 4} is not allowed without method.autoencoder",
        ),
    ],
)
def test_autoencoder_and_latent_settings_that_cannot_work_are_refused(model, method, message):
    with pytest.raises(ConfigError) as error:
        validate_run({"model": model, "method": method})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_overfit_mode_is_refused_for_an_autoencoder_which_draws_no_samples():
    with pytest.raises(ConfigError, match="data.limit_per_class: 2 is not allowed with method.name 'autoencoder'"):
        validate_run(
            {"data": {"limit_per_class": 2}, "model": {"name": "mlp_autoencoder"}, "method": {"name": "autoencoder"}}
        )


def test_label_dropout_applies_to_latent_runs_too():
    config = validate_run(
        {
            "model": {"name": "mlp", "class_conditional": True},
            "method": {"autoencoder": "runs/ae", "clip_sample": False, "label_dropout": 0.5},
        }
    )
    method = build_method(config)
    seen = []

    def denoiser(x, t, class_labels=None):
        seen.append(class_labels)
        return x * 0

    torch.manual_seed(0)
    method.loss(denoiser, {"images": torch.randn(4000, 6), "class_labels": torch.zeros(4000, dtype=torch.long)})
    assert 0.47 < (seen[0] == 10).float().mean() < 0.53


@pytest.mark.parametrize("spec", ["autoencoder-mlp", "autoencoder-conv", "latent-diffusion"])
def test_each_autoencoder_spec_trains_checkpoints_resumes_bitwise_and_previews(spec, autoencoders, tmp_path):
    common = [
        "device=cpu",
        "data.subset=64",
        "data.download=false",
        "train.batch_size=16",
        "train.max_minutes=null",
        "train.progress=lines",
        "train.sample_every_epochs=null",
        "train.checkpoint_every_minutes=null",
        "train.warmup_steps=0",
        "sample.num_samples=8",
        "sample.num_inference_steps=3",
        "eval.num_samples=50",
    ]
    if spec == "latent-diffusion":
        common += [f"method.autoencoder={autoencoders['mlp']}", "model.hidden_dim=32", "model.num_layers=2"]
    else:
        common += ["model.hidden_dim=32", "model.base_channels=8", "model.norm_groups=4"]
    whole = assert_resumes_bitwise(REPO / "configs/jobs" / f"{spec}.yaml", common, tmp_path)
    with Image.open(whole / "samples/final.png") as image:
        assert np.asarray(image).std() > 5
    if spec == "latent-diffusion":
        assert main(["sample", str(whole)]) == 0
        assert len(np.load(whole / "samples/latent-ddim3-eta1-w2-seed0.npz")["images"]) == 8


def test_bare_autoencoder_weights_are_described_by_an_explicit_override(autoencoders, mnist_root, tmp_path):
    """A .pt of bare weights (as other code bases save them) records no config: the run says
    what it is with method.autoencoder_model, which also overrides a recorded config."""
    ema = torch.load(autoencoders["mlp"] / "checkpoints/latest.pt", weights_only=False)["ema"]
    torch.save({"model_state_dict": ema}, tmp_path / "bare.pt")
    reference = str(tmp_path / "bare.pt")
    with pytest.raises(ConfigError, match="not allowed without method.autoencoder_model: it holds bare weights"):
        train(latent_config(mnist_root, reference), tmp_path / "latent")
    wrong = {"name": "mlp_autoencoder", "latent_dim": 7, "hidden_dim": 32, "num_layers": 1}
    for source, settings in ((reference, wrong), (str(autoencoders["mlp"]), {"latent_dim": 7})):
        with pytest.raises(ConfigError) as error:
            train(latent_config(mnist_root, source, method={"autoencoder_model": settings}), tmp_path / "latent")
        assert "its weights do not fit a mlp_autoencoder with these settings (method.autoencoder_model)" in str(
            error.value
        ) and "\n" not in str(error.value)
        assert not (tmp_path / "latent").exists()

    right = wrong | {"latent_dim": 6}
    config = latent_config(mnist_root, reference, method={"autoencoder_model": right})
    assert (
        train(config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 3})}), tmp_path / "a")
        == 0
    )
    (tmp_path / "bare.pt").unlink()  # resumes from its own checkpoint and the run's own settings
    assert train(config, tmp_path / "a") == 0
    model = torch.load(tmp_path / "a/checkpoints/latest.pt", weights_only=False)["model"]
    for key, tensor in ema.items():
        assert torch.equal(model[f"autoencoder.{key}"], tensor), key
    assert inspect_checkpoint(tmp_path / "a")["parent"]["method"] is None  # bare weights: nothing recorded


@pytest.mark.parametrize("num_samples, side", [(1, 2), (8, 2), (12, 2), (16, 4), (50, 6), (64, 8), (100, 10)])
def test_the_reconstruction_preview_is_a_square_of_row_pairs(num_samples, side, tmp_path):
    from diffusion.data import DataSpec, write_samples
    from diffusion.methods.autoencoder import Autoencoder

    net = MLPAutoencoder((1, 6, 6), latent_dim=3, hidden_dim=8)
    examples = {"images": torch.rand(256, 1, 6, 6) * 2 - 1}
    shown = Autoencoder().preview(net, num_samples, DataSpec("image", (1, 6, 6)), None, None, "cpu", examples)
    assert shown.shape == (side * side, 1, 6, 6)
    for row in range(0, side, 2):  # originals, then their reconstructions, in pairs of rows
        originals = examples["images"][row // 2 * side : row // 2 * side + side]
        assert torch.equal(shown[row * side : (row + 1) * side], originals)
        expected = net.decode(net.encode(originals)) * 2 - 1
        assert torch.allclose(shown[(row + 1) * side : (row + 2) * side], expected, atol=1e-6)  # batch sizes differ
    grid = write_samples(DataSpec("image", (1, 6, 6)), shown, tmp_path, "preview", keep_arrays=False)["grid"]
    with Image.open(grid) as image:  # the grid keeps the pairs: side images per row
        assert image.size == (2 + side * 8, 2 + side * 8)
    few = Autoencoder().preview(
        net, 64, DataSpec("image", (1, 6, 6)), None, None, "cpu", {"images": examples["images"][:10]}
    )
    assert few.shape[0] == 16  # ten examples fill 4 x 4 with eight originals: the side shrinks, whole rows


def test_the_latent_report_copes_with_one_dimension_and_too_few_classes(tmp_path):
    one_dimension = latent_space_report(torch.randn(40, 1), torch.arange(40) % 4, tmp_path / "a.png")
    assert one_dimension["silhouette"] is not None and (tmp_path / "a.png").is_file()
    one_class = latent_space_report(torch.randn(30, 5), torch.zeros(30, dtype=torch.long), tmp_path / "b.png")
    assert one_class["silhouette"] is None and one_class["calinski_harabasz"] is None
    every_point_its_class = latent_space_report(torch.randn(3, 5), torch.arange(3), tmp_path / "c.png")
    assert every_point_its_class["silhouette"] is None and (tmp_path / "c.png").is_file()


def test_a_latent_unet_is_checked_against_the_latent_grid_in_one_line():
    from diffusion.config import ModelConfig
    from diffusion.nets import build_denoiser

    model = ModelConfig(base_channels=8, channel_mults=[1, 2], norm_groups=4, attention_resolutions=[14])
    with pytest.raises(ConfigError) as error:
        build_denoiser(model, (4, 7, 7), None)
    assert str(error.value) == (
        "model.attention_resolutions: 14 is not allowed: the levels of 7x7 inputs are 7, 4 "
        "(the autoencoder's latents are 4x7x7)"
    )
    assert build_denoiser(model.model_copy(update={"attention_resolutions": [4]}), (4, 7, 7), None)(
        torch.randn(2, 4, 7, 7), torch.tensor([3, 4])
    ).shape == (2, 4, 7, 7)


def test_a_parent_file_that_holds_code_is_refused_without_running_it(mnist_root, tmp_path, capsys):
    class RunsCode:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "extra": RunsCode()}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError) as error:
        train(latent_config(mnist_root, str(tmp_path / "foreign.pt")), tmp_path / "latent")
    assert "it holds objects besides weights, which could run code when loaded" in str(error.value)
    assert "this ran" not in capsys.readouterr().out and not (tmp_path / "latent").exists()


@pytest.mark.parametrize(
    ("autoencoder", "model", "method", "sampler"),
    [
        ("conv", {"name": "dit", "dit_size": "tiny", "patch_size": 1}, "meanflow", "meanflow"),
        ("conv", {"name": "dit", "dit_size": "tiny", "patch_size": 7}, "ddpm", "ddim"),
        ("mlp", {"name": "mlp", "hidden_dim": 32, "num_layers": 2}, "flow_matching", "heun"),
    ],
)
def test_flows_and_the_dit_run_on_an_autoencoders_latents(autoencoder, model, method, sampler, autoencoders, tmp_path):
    """Latent flow matching and MeanFlow, and a DiT on the conv autoencoder's 2x7x7 latent grid,
    train and sample images through the decoder from their own checkpoint."""
    settings = {"name": method, "autoencoder": str(autoencoders[autoencoder]), "clip_sample": False}
    config = config_of(
        os.environ["DIFFUSION_DATA_ROOT"],  # the autoencoders fixture skips without it
        model | {"class_conditional": True},
        settings,
        sample={"sampler": sampler, "num_inference_steps": 2, "num_samples": 8},
    )
    assert train(config, tmp_path / "run") == 0
    assert main(["sample", str(tmp_path / "run"), "--set", "sample.num_samples=8"]) == 0
    images = np.load(next((tmp_path / "run/samples").glob(f"latent-{sampler}2*.npz")))["images"]
    assert images.shape == (8, 1, 28, 28) and images.std() > 0
