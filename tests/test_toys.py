"""2-D toys: the distributions, their datasets and spec, the energy distance, and their pictures."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from diffusion.config import TOY_DATASETS, RunConfig
from diffusion.data import (
    DataSpec,
    PointDataset,
    has_validation,
    load_dataset,
    load_validation,
    make_toy,
    write_flow,
    write_samples,
)
from diffusion.data.toys import EIGHT_RADIUS, EIGHT_STD, TOYS, mixture_means, num_classes
from diffusion.scores import sample_scores
from diffusion.scores.points import energy_distance, point_scores, reference_floor

# Documented bounds of each toy's coordinates (|x| <= bound), with the noise's tails up to 5 std.
BOUNDS = {"moons": 4.0, "eight_gaussians": EIGHT_RADIUS + 5 * EIGHT_STD, "checkerboard": 4.0, "spirals": 4.0}
BOUNDS["gaussian_mixture"] = 3.0 + 5 * 0.25


def test_the_toys_are_the_configs_toys():
    assert TOYS == TOY_DATASETS


@pytest.mark.parametrize("name", TOYS)
def test_a_toy_is_a_deterministic_labelled_finite_bounded_draw(name):
    before = torch.get_rng_state()
    points, labels = make_toy(name, 5000, seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # its own generator, never the global one
    assert points.shape == (5000, 2) and points.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    again, again_labels = make_toy(name, 5000, seed=3)
    assert torch.equal(points, again) and torch.equal(labels, again_labels)
    other, _ = make_toy(name, 5000, seed=4)
    assert not torch.equal(points, other)
    classes = num_classes(name)
    assert classes == {"moons": 2, "spirals": 2}.get(name, 8)
    assert labels.min() >= 0 and labels.max() < classes
    assert len(labels.unique()) == classes  # every class is drawn
    assert torch.isfinite(points).all()
    assert points.abs().max() <= BOUNDS[name]
    assert 0.3 < points.std() < 3  # of order 1


def test_moons_classes_are_the_upper_and_lower_moon():
    points, labels = make_toy("moons", 4000, seed=0)
    upper, lower = points[labels == 0], points[labels == 1]
    # The upper moon bulges up and sits left, the lower one is it turned by pi about the origin.
    assert upper[:, 1].mean() > 0.4 and lower[:, 1].mean() < -0.4
    assert upper[:, 0].mean() < -0.3 and lower[:, 0].mean() > 0.3
    # Its arc: the noise-free points are 2 from the moon's centre (-1, -0.5) (upper) or (1, 0.5) (lower).
    radius = (upper - torch.tensor([-1.0, -0.5])).norm(dim=1)
    assert (radius - 2).abs().median() < 0.2


def test_eight_gaussians_lie_near_their_circle_around_their_mode():
    points, labels = make_toy("eight_gaussians", 4000, seed=0)
    radius = points.norm(dim=1)
    assert (radius - EIGHT_RADIUS).abs().mean() < EIGHT_STD
    assert ((radius - EIGHT_RADIUS).abs() < 4 * EIGHT_STD).float().mean() > 0.999
    angle = labels.float() * math.pi / 4
    centres = EIGHT_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    assert (points - centres).norm(dim=1).max() < 6 * EIGHT_STD


def test_checkerboard_points_fall_only_on_black_squares_one_per_label():
    points, labels = make_toy("checkerboard", 4000, seed=0)
    square = ((points + 4) // 2).long()  # (column, row), 0..3
    assert square.min() >= 0 and square.max() <= 3
    assert ((square[:, 0] + square[:, 1]) % 2 == 0).all()
    index = square[:, 1] * 4 + square[:, 0]
    for label in range(8):  # each label is one square
        assert len(index[labels == label].unique()) == 1
    assert len(index.unique()) == 8


def test_spirals_arms_are_point_reflections():
    points, labels = make_toy("spirals", 4000, seed=0)
    first, second = points[labels == 0], points[labels == 1]
    # -second is drawn from the first arm: near each of its points lies one of the first arm.
    nearest = torch.cdist(-second[:500], first).min(dim=1).values
    assert nearest.median() < 0.1
    # And the two arms are apart: the nearest point of the other arm is mostly much further.
    across = torch.cdist(second[:500], first).min(dim=1).values
    assert across.median() > nearest.median() * 2


def test_gaussian_mixture_means_are_fixed_whatever_the_seed():
    means = mixture_means(5)
    assert means.abs().max() <= 3
    for seed in (0, 1):
        points, labels = make_toy("gaussian_mixture", 3000, seed=seed, num_components=5)
        assert num_classes("gaussian_mixture", 5) == 5 and labels.max() == 4
        for k in range(5):
            assert (points[labels == k].mean(0) - means[k]).norm() < 0.1


def test_an_unknown_toy_is_refused():
    with pytest.raises(ValueError, match="unknown toy"):
        make_toy("swiss_roll", 10, seed=0)


def test_energy_distance_is_zero_for_one_set_symmetric_and_grows_with_a_shift():
    x, _ = make_toy("moons", 600, seed=0)
    y, _ = make_toy("moons", 500, seed=1)
    assert energy_distance(x, x) == 0.0
    assert energy_distance(x, y) == pytest.approx(energy_distance(y, x), rel=1e-9)
    shifted = [energy_distance(x, y + torch.tensor([shift, 0.0])) for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(shifted, shifted[1:])), shifted


def test_energy_distance_is_chunked_like_whole(monkeypatch):
    import diffusion.scores.points as points_module

    x, y = torch.randn(300, 2), torch.randn(200, 2) + 0.3
    whole = energy_distance(x, y)
    monkeypatch.setattr(points_module, "CHUNK_ELEMENTS", 1000)  # blocks of 3 to 5 rows
    assert energy_distance(x, y) == pytest.approx(whole, rel=1e-12)


def test_another_toy_is_far_above_the_real_floor():
    held_out, _ = make_toy("moons", 4000, seed=1)
    same, _ = make_toy("moons", 2000, seed=0)
    other, _ = make_toy("eight_gaussians", 2000, seed=0)
    real = point_scores(same, held_out)
    assert real["num_samples"] == 2000 and real["nonfinite"] == 0.0
    assert real["real_floor"] < 0.02 and real["energy_distance"] < 0.02
    assert 0.1 < real["ratio_to_floor"] < 10
    wrong = point_scores(other, held_out)
    assert wrong["real_floor"] == real["real_floor"]  # the floor is of the held-out points alone
    assert wrong["energy_distance"] > 20 * wrong["real_floor"]


def test_point_scores_leave_out_nonfinite_samples_and_cap_at_half_the_held_out():
    held_out, _ = make_toy("moons", 1000, seed=1)
    samples, _ = make_toy("moons", 800, seed=0)
    samples[:200, 0] = float("nan")
    samples[200:240, 1] = float("inf")
    scores = point_scores(samples, held_out)
    assert scores["nonfinite"] == pytest.approx(0.3)
    assert scores["num_samples"] == 500  # 560 finite, capped at 1000 // 2
    assert math.isfinite(scores["energy_distance"])
    assert scores["energy_distance"] == energy_distance(samples[240:740], held_out[:500])
    assert scores["real_floor"] == reference_floor(held_out[:500], held_out[500:], 500)
    lost = point_scores(torch.full((10, 2), float("nan")), held_out)
    assert lost["energy_distance"] == math.inf and lost["nonfinite"] == 1.0 and lost["num_samples"] == 0
    assert lost["ratio_to_floor"] == math.inf and lost["real_floor"] > 0


def test_the_floor_is_what_real_draws_score_against_the_same_reference_on_average():
    """reference_floor is the mean energy distance of fresh real draws to one fixed reference: a
    2000-draw Monte Carlo mean agrees with it within 4 standard errors of the two together (the
    floor's own from four disjoint blocks of `rest`). With as many points of rest as of the reference
    it is that pair's distance, exactly; too little input is refused."""
    for name in ("eight_gaussians", "moons"):
        points, _ = make_toy(name, 120_050, seed=1)
        reference, rests, draws = points[:50], points[50:20_050].chunk(4), points[20_050:].view(2000, 50, 2)
        floors = torch.tensor([reference_floor(reference, rest, 50) for rest in rests])
        distances = torch.tensor([energy_distance(draw, reference) for draw in draws])
        error = (distances.var() / len(distances) + floors.var() / len(floors)).sqrt().item()
        assert abs(distances.mean().item() - floors.mean().item()) < 4 * error, (name, floors, distances.mean())
        # The floor is far from 0 on this scale: the check above could tell a wrong term apart.
        assert floors.mean().item() > 20 * error
        rest = points[50:100]
        assert reference_floor(reference, rest, 50) == pytest.approx(energy_distance(rest, reference), rel=1e-9)
    with pytest.raises(ValueError, match="at least 4 held-out points"):
        point_scores(torch.zeros(5, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="2 or more points of rest"):
        reference_floor(torch.zeros(3, 2), torch.zeros(1, 2), 3)


def test_sample_scores_of_points_are_point_scores():
    validation = PointDataset(*make_toy("moons", 1000, seed=1), num_classes=2)
    samples, _ = make_toy("moons", 300, seed=0)
    scores = sample_scores(None, None, validation, {"scatter": None, "values": samples}, "cpu", 0, 1)
    assert scores == point_scores(samples, validation.points)


def test_data_spec_json_round_trips_points_and_keeps_the_old_layouts():
    points = DataSpec("points", (2,), num_classes=8)
    assert points.to_json() == {"kind": "points", "shape": [2], "num_classes": 8}
    assert DataSpec.from_json(points.to_json()) == points
    assert points.preview_count == 2000
    image = DataSpec("image", (1, 28, 28), num_classes=10)
    assert image.to_json() == {"kind": "image", "image_shape": [1, 28, 28], "num_classes": 10}
    assert DataSpec.from_json(image.to_json()) == image and image.preview_count == 64
    text = DataSpec("text", (64,), vocab_size=65, tokenizer={"type": "char"}, chars_per_token=1.0)
    assert text.to_json() == {
        "kind": "text",
        "vocab_size": 65,
        "block_size": 64,
        "tokenizer": {"type": "char"},
        "chars_per_token": 1.0,
    }
    assert DataSpec.from_json(text.to_json()) == text and text.preview_count == 8


def test_a_toy_config_loads_disjoint_train_and_test_point_datasets():
    config = RunConfig(data={"dataset": "moons", "num_points": 500}).data
    train, test = load_dataset(config, "train"), load_validation(config)
    assert has_validation(config)
    assert isinstance(train, PointDataset) and isinstance(test, PointDataset)
    assert len(train) == 500 and len(test) == 10_000
    assert train.spec() == DataSpec("points", (2,), num_classes=2)
    assert torch.equal(load_dataset(config, "test").points, test.points)
    assert torch.cdist(train.points, test.points).min() > 0  # no training point is held out
    batch = train.batch(torch.tensor([3, 1, 4]), torch.device("cpu"))
    assert torch.equal(batch["points"], train.points[[3, 1, 4]]) and batch["points"].dtype == torch.float32
    assert torch.equal(batch["labels"], train.labels[[3, 1, 4]])
    with pytest.raises(ValueError, match="splits"):
        load_dataset(config, "val")


def test_write_samples_of_points_draws_a_scatter_and_keeps_the_points(tmp_path):
    points, labels = make_toy("eight_gaussians", 500, seed=0)
    written = write_samples(DataSpec("points", (2,), num_classes=8), points, tmp_path, "final", labels=labels)
    assert written == {"scatter": tmp_path / "final.png"}
    with Image.open(written["scatter"]) as image:
        assert image.format == "PNG" and min(image.size) > 100
    arrays = np.load(tmp_path / "final.npz")
    assert arrays["points"].dtype == np.float32 and np.array_equal(arrays["points"], points.numpy())
    assert np.array_equal(arrays["labels"], labels.numpy())
    write_samples(DataSpec("points", (2,)), points, tmp_path, "preview", keep_arrays=False)
    assert (tmp_path / "preview.png").is_file() and not (tmp_path / "preview.npz").exists()
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_write_flow_of_points_writes_a_frame_per_time_and_a_panel_grid(tmp_path):
    data, _ = make_toy("moons", 300, seed=0)
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    times = torch.linspace(1, 0, 9)
    path = torch.stack([t * noise + (1 - t) * data for t in times])
    written = write_flow(DataSpec("points", (2,)), times, path, tmp_path, labels=torch.arange(300) % 2)
    assert written == [tmp_path / "flow.gif", tmp_path / "flow.png"]
    with Image.open(written[0]) as gif:
        assert gif.format == "GIF" and sum(1 for _ in ImageSequence.Iterator(gif)) == 9
    with Image.open(written[1]) as grid:
        assert grid.format == "PNG" and grid.width > 3 * grid.height  # 6 panels in a row
    with pytest.raises(ValueError, match="path must be"):
        write_flow(DataSpec("points", (2,)), times[:-1], path, tmp_path)


def test_write_flow_of_images_is_a_grid_of_samples_by_steps(tmp_path):
    times = torch.linspace(1, 0, 20)
    path = torch.rand(20, 10, 1, 6, 6) * 2 - 1  # 10 samples: 8 rows; 20 steps: 8 columns
    (grid,) = write_flow(DataSpec("image", (1, 6, 6)), times, path, tmp_path, name="digits")
    assert grid == tmp_path / "digits.png"
    with Image.open(grid) as image:  # save_image pads 2 pixels around each tile
        assert image.size == (8 * (6 + 2) + 2, 8 * (6 + 2) + 2)
    (few,) = write_flow(DataSpec("image", (1, 6, 6)), times[:3], path[:3, :2], tmp_path, name="few")
    with Image.open(few) as image:
        assert image.size == (3 * 8 + 2, 2 * 8 + 2)


def test_write_flow_refuses_text(tmp_path):
    with pytest.raises(ValueError, match="not text"):
        write_flow(DataSpec("text", (8,)), torch.ones(2), torch.zeros(2, 1, 8, dtype=torch.long), tmp_path)
