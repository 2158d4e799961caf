"""Loss terms (pure functions), the training config and the image-folder data path."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lanit_rt.config import ConfigError
from lanit_rt.images import wide_grey_to_l
from training import losses
from training.config import DEFAULT_DATA_LAMBDA_ID, DEFAULT_DATA_LR, TrainConfig, parse_override
from training.data import (SHIFT_PIXELS, DataError, ImageSet, augment_batch, check_images, find_images,
                           load_rgb)


def test_ablate_targets_removes_one_active_domain():
    gen = torch.Generator().manual_seed(0)
    targets = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1], [0, 1, 0, 1]]).float()
    for _ in range(20):
        ablated, removed = losses.ablate_targets(targets, gen)
        rows = torch.arange(4)
        assert torch.all(targets[rows, removed] == 1), "the removed domain was active"
        assert torch.all(ablated[rows, removed] == 0), "the ablated target lacks it"
        assert torch.all(ablated.sum(1) >= 1), "every ablated target still has a domain"
        multi = targets.sum(1) > 1
        # multi-domain targets lose exactly that one domain; single ones switch to another domain
        assert torch.equal(ablated[multi].sum(1), targets[multi].sum(1) - 1)
        assert not torch.equal(ablated[1], targets[1]) and ablated[1].sum() == 1


def test_domain_regularization_rewards_target_and_punishes_removed_domain():
    targets = torch.tensor([[1.0, 0.0, 1.0]])
    removed = torch.tensor([2])
    good = torch.tensor([[0.1, -0.1, 0.1]])
    ablated_good = torch.tensor([[0.1, -0.1, -0.1]])  # removed domain (2) now scores low
    ablated_bad = torch.tensor([[0.1, -0.1, 0.1]])  # the un-ablated labels' loophole: still high
    loss_good = losses.domain_regularization_loss(good, targets, ablated_good, removed, scale=50.0)
    loss_bad = losses.domain_regularization_loss(good, targets, ablated_bad, removed, scale=50.0)
    assert loss_good < 0.05 and loss_bad > 5.0
    expected = F.binary_cross_entropy_with_logits(50 * good, targets) + \
        F.binary_cross_entropy_with_logits(torch.tensor([-5.0]), torch.tensor([0.0]))
    torch.testing.assert_close(loss_good, expected)


def test_adversarial_loss_uses_only_active_heads():
    logits = torch.tensor([[5.0, -100.0], [-100.0, 5.0]])
    active = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    real = losses.adversarial_loss(logits, active, real=True)
    torch.testing.assert_close(real, F.softplus(torch.tensor(-5.0)))
    assert losses.adversarial_loss(logits, 1 - active, real=True) > 50


def test_r1_penalty_matches_closed_form():
    x = torch.randn(3, 2, requires_grad=True)
    weights = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    logits = x @ weights  # d logit_k / dx = weights[:, k]
    active = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    r1 = losses.r1_penalty(logits, active, x, score="mean")
    grads = (active / active.sum(1, keepdim=True)) @ weights.t()
    torch.testing.assert_close(r1, 0.5 * grads.pow(2).sum(1).mean())
    # the released LANIT code differentiates the sum of the active logits (the default)
    r1_sum = losses.r1_penalty(logits, active, x)
    torch.testing.assert_close(r1_sum, 0.5 * (active @ weights.t()).pow(2).sum(1).mean())


def test_adversarial_loss_averages_over_pairs_or_samples():
    # sample 0 has two active heads with BCE b1, b2; sample 1 one head with BCE b3
    logits = torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]])
    active = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    b1, b2, b3 = F.softplus(torch.tensor([-1.0, 2.0, -3.0]))
    pairs = losses.adversarial_loss(logits, active, real=True)
    torch.testing.assert_close(pairs, (b1 + b2 + b3) / 3)
    samples = losses.adversarial_loss(logits, active, real=True, average="samples")
    torch.testing.assert_close(samples, ((b1 + b2) / 2 + b3) / 2)
    with pytest.raises(ValueError, match="pairs"):
        losses.adversarial_loss(logits, active, real=True, average="rows")


def test_removed_domain_loss_is_minus_log_relu_cosine():
    cosines = torch.tensor([[0.30, 0.20, 0.10], [0.25, -0.05, 0.40]], requires_grad=True)
    removed = torch.tensor([1, 1])
    loss = losses.removed_domain_loss(cosines, removed)
    # a non-positive cosine is clamped: -log(eps) ~ 36, and no gradient flows through it
    torch.testing.assert_close(loss, (-torch.log(torch.tensor(0.20)) + 36.0437) / 2, atol=1e-3, rtol=0)
    loss.backward()
    torch.testing.assert_close(cosines.grad, torch.tensor([[0.0, -1 / (2 * 0.20), 0.0], [0.0, 0.0, 0.0]]))


def test_the_l1_terms_are_mean_absolute_differences():
    """Closed forms: the official iteration test builds its reference step from these helpers, so
    they are pinned here on their own (a squared or scaled term would otherwise pass it)."""
    a = torch.tensor([[0.0, 1.0], [2.0, -3.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # |a - b| = 1, 0, 2, 4: mean 1.75 (L2 would be 5.25)
    for term in (losses.style_reconstruction_loss, losses.diversity_loss, losses.cycle_loss,
                 losses.identity_loss):
        assert term(a, b).item() == 1.75, term.__name__


def test_the_ema_update_moves_each_weight_by_one_minus_beta():
    from training.train import Nets, update_ema

    def nets(value: float) -> Nets:
        made = [torch.nn.Linear(2, 2) for _ in range(4)]
        for module in made:
            torch.nn.init.constant_(module.weight, value)
            torch.nn.init.constant_(module.bias, value)
        return Nets(*made)

    ema, live = nets(0.0), nets(1.0)
    update_ema(ema, live, beta=0.9)  # ema + (1 - beta) * (live - ema)
    for name, module in ema.modules().items():
        for p in module.parameters():
            assert torch.allclose(p, torch.full_like(p, 0.1)), name
    assert torch.equal(live.generator.weight, torch.ones(2, 2))  # the live nets are left alone


def test_schedules():
    assert losses.diversity_weight(0, 1.0, 100) == 1.0
    assert losses.diversity_weight(50, 1.0, 100) == 0.5
    assert losses.diversity_weight(150, 1.0, 100) == 0.0
    assert losses.ema_beta(0, 0.999) == pytest.approx(0.1)
    assert losses.ema_beta(10**6, 0.999) == 0.999
    # lazy R1: every 4th step at 4x the weight, the same pull on average; every 1: each step
    weights = [losses.lazy_r1_weight(step, 0.5, 4) for step in range(8)]
    assert weights == [2.0, 0, 0, 0, 2.0, 0, 0, 0] and sum(weights) == 8 * 0.5
    assert [losses.lazy_r1_weight(step, 0.5, 1) for step in range(3)] == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="at least 1"):
        losses.lazy_r1_weight(0, 1.0, 0)
    with pytest.raises(ConfigError, match="r1_every"):
        TrainConfig(r1_every=0)


def test_overrides_are_typed():
    assert parse_override("lr=3e-4") == ("lr", 3e-4)
    assert parse_override("steps=12") == ("steps", 12)
    assert parse_override("base_dim=none") == ("base_dim", None)
    assert parse_override("domains=a, b") == ("domains", ("a", "b"))
    assert parse_override("compile=false") == ("compile", False)
    assert parse_override("compile=auto") == ("compile", None)  # auto only where None means it
    assert parse_override("compile_after=auto") == ("compile_after", None)
    assert parse_override("compile_after=300") == ("compile_after", 300)
    with pytest.raises(ConfigError, match="compile expects bool"):
        parse_override("compile=fast")
    with pytest.raises(ConfigError, match="expects int"):
        parse_override("base_dim=auto")
    with pytest.raises(ConfigError, match="unknown config key"):
        parse_override("learning_rate=1")
    with pytest.raises(ConfigError, match="expects int"):
        parse_override("steps=many")
    with pytest.raises(ConfigError, match="at least 2"):
        TrainConfig(domains=("solo",))
    with pytest.raises(ConfigError, match="threshold must be a finite number, got nan"):
        TrainConfig(threshold=float("nan"))
    for out in ("", " "):  # `--out ""` or `--set out=`: not the working folder
        with pytest.raises(ConfigError, match="out must name a folder, got an empty one"):
            TrainConfig(out=out)


def test_recipe_and_arch_resolve_their_settings():
    folder = {"data": "images", "domains": ("a", "b")}
    official, ours = TrainConfig(**folder), TrainConfig(recipe="lanit-rt", **folder)
    assert (official.lr, official.mapping_lr, official.lambda_dl) == (1e-4, 1e-4, 0.5)
    assert (ours.lr, ours.mapping_lr, ours.lambda_dl) == (2e-4, 2e-4, 1.0)
    assert TrainConfig(lr=3e-4, **folder).lr == 3e-4 and TrainConfig(lr=3e-4, **folder).mapping_lr == 1e-4
    # the embedded default data: its short-budget learning rates wherever none is given
    assert (TrainConfig().lr, TrainConfig().mapping_lr) == (DEFAULT_DATA_LR, DEFAULT_DATA_LR) != (1e-4, 1e-4)
    assert (TrainConfig(lr=3e-4).lr, TrainConfig(lr=3e-4).mapping_lr) == (3e-4, DEFAULT_DATA_LR)
    assert TrainConfig(recipe="lanit-rt").lambda_dl == 1.0
    assert (TrainConfig().steps, official.steps, TrainConfig(steps=7).steps) == (3000, 1000, 7)
    # the identity term: on for the embedded default data only, unless set
    assert (TrainConfig().lambda_id, official.lambda_id) == (DEFAULT_DATA_LAMBDA_ID, 0.0)
    assert TrainConfig(lambda_id=0.0).lambda_id == 0.0 and TrainConfig(lambda_id=2.0, **folder).lambda_id == 2.0
    with pytest.raises(ConfigError, match="lambda_id must be 0 .off. or more, got -1"):
        TrainConfig(lambda_id=-1.0)
    # Every loss weight: a negative one would flip its term's sign or silently turn it off.
    for key in ("lambda_r1", "lambda_sty", "lambda_ds", "lambda_cyc", "lambda_dl"):
        assert getattr(TrainConfig(**{key: 0.0}), key) == 0.0
        for bad in (-1.0, float("nan")):
            with pytest.raises(ConfigError, match=f"^{key} must be 0 .off. or more, got"):
                TrainConfig(**{key: bad})
    # The diversity decay: over all steps unless set, and then over at least one step.
    assert (TrainConfig(steps=30).ds_decay_span, TrainConfig(steps=30, ds_decay_steps=7).ds_decay_span) == (30, 7)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match=f"ds_decay_steps must be at least 1 .or unset: all steps., got {bad}"):
            TrainConfig(ds_decay_steps=bad)
    wide = TrainConfig(arch="stargan-v2", img_size=128)
    assert (wide.base_dim, wide.max_dim, wide.mapping_dim) == (None, 512, 512)
    model = wide.model_config(("a", "b"))
    assert (model.stem_dim, model.max_dim, model.mapping_dim) == (128, 512, 512)
    assert TrainConfig.from_dict(wide.to_dict()) == wide  # a resolved config round-trips
    with pytest.raises(ConfigError, match="recipe must be one of"):
        TrainConfig(recipe="stargan")
    with pytest.raises(ConfigError, match="arch must be one of"):
        TrainConfig(arch="big")


def _write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[5:15, 5:15] = (255, 0, 0, 255)
    (folder / "sub").mkdir()
    Image.fromarray(rgba, "RGBA").save(folder / "sub" / "icon.png")
    Image.fromarray(rng.integers(0, 255, (33, 33), dtype=np.uint8), "L").save(folder / "grey.webp")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "notes.txt").write_text("not an image")


def test_folder_scan_follows_linked_folders_once_and_leaves_out_hidden_files(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for folder in (data, elsewhere, data / ".thumbnails"):
        folder.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    Image.new("RGB", (8, 8)).save(elsewhere / "b.png")
    Image.new("RGB", (8, 8)).save(data / ".thumbnails" / "a.png")
    (data / "._a.png").write_bytes(b"macOS resource fork")
    (data / ".DS_Store").write_bytes(b"\0")
    (data / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(data, target_is_directory=True)  # must not recurse for ever
    (data / "dangling.png").symlink_to(tmp_path / "gone.png")
    assert find_images(data) == [data / "a.png", data / "linked" / "b.png"]


def test_folder_scan_leaves_out_run_folders_and_the_folders_it_is_told(tmp_path):
    data = tmp_path / "data"
    for folder in ("faces", "runs/old/samples", "runs/new", "keep/deeper"):
        (data / folder).mkdir(parents=True)
    for image in ("faces/a.png", "runs/old/samples/step_000010.png", "runs/new/x.png", "keep/deeper/b.png"):
        Image.new("RGB", (8, 8)).save(data / image)
    (data / "runs" / "old" / "train_config.json").write_text("{}")  # an earlier run's folder
    assert find_images(data) == [data / "faces/a.png", data / "keep/deeper/b.png", data / "runs/new/x.png"]
    assert find_images(data, leave_out=[tmp_path / "data" / "runs" / "new", data / "keep"]) == [data / "faces/a.png"]


def test_load_rgb_applies_the_exif_orientation(tmp_path):
    pixels = np.zeros((40, 80, 3), np.uint8)  # stored 80 wide, 40 high, left half red
    pixels[:, :40] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 40 wide, 80 high, red on top
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    shown = np.asarray(load_rgb(tmp_path / "phone.jpg"))
    assert shown.shape == (80, 40, 3)
    assert shown[10, 20, 0] > 200 and shown[70, 20, 0] < 50


def test_folder_scan_skips_corrupt_files_and_converts_modes(tmp_path):
    _write_images(tmp_path / "data")
    paths = find_images(tmp_path / "data")
    assert [p.name for p in paths] == ["broken.png", "grey.webp", "icon.png", "wide.jpg"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan = check_images(paths, progress=False)
    assert [p.name for p in scan.paths] == ["grey.webp", "icon.png", "wide.jpg"]
    assert len(scan.skipped) == 1 and any("broken.png" in str(w.message) for w in caught)
    icon = np.asarray(load_rgb(tmp_path / "data" / "sub" / "icon.png"))
    assert icon.shape == (20, 20, 3)
    assert tuple(icon[0, 0]) == (255, 255, 255) and tuple(icon[10, 10]) == (255, 0, 0)
    images = ImageSet(scan.paths, 32, progress=False)
    batch = images.batch(torch.tensor([0, 1, 2]))
    assert batch.shape == (3, 3, 32, 32) and batch.min() >= -1 and batch.max() <= 1
    lazy = ImageSet(scan.paths, 32, progress=False, max_cache_bytes=0)
    assert lazy.cache is None and torch.equal(lazy.batch(torch.tensor([2, 0])), batch[[2, 0]])


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
    # Pillow's convert("RGB") clips 16-bit samples at 255: this ramp came out with mean 254.5.
    ramp = np.linspace(0, 65535, 32 * 48).round().astype(np.uint16).reshape(32, 48)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")
    rgb = np.asarray(load_rgb(path)).astype(np.int64)
    expected = np.rint(ramp / 257.0).astype(np.int64)  # v * 255 / 65535
    assert rgb.shape == (32, 48, 3)
    assert all(np.array_equal(rgb[..., c], expected) for c in range(3))
    assert abs(rgb.mean() - 127.5) < 0.5
    # The training set decodes through the same path (resampled, so the mean only).
    batch = ImageSet([path], 32, progress=False).uint8(torch.tensor([0])).double()
    assert abs(float(batch.mean()) - 127.5) < 3
    # A PNG transparent grey value becomes white, as transparency does in the other modes.
    flat = np.full((4, 4), 130 * 257, dtype=np.uint16)
    flat[0, :] = 1000
    Image.fromarray(flat).save(tmp_path / "trns16.png", transparency=1000)
    grey = np.asarray(load_rgb(tmp_path / "trns16.png"))[..., 0]
    assert (grey[0] == 255).all() and (grey[1:] == 130).all()


def test_wide_grey_modes_without_a_png_encoder():
    samples = np.array([[0, 128, 257, 32768, 65535]], dtype=np.uint16)
    big_endian = Image.frombytes("I;16B", (5, 1), samples.astype(">u2").tobytes())
    as_int32 = Image.fromarray(np.array([[-5, 128, 257, 32768, 70000]], dtype=np.int32))  # mode "I"
    assert as_int32.mode == "I"
    assert np.asarray(wide_grey_to_l(big_endian)).tolist() == [[0, 0, 1, 128, 255]]
    assert np.asarray(wide_grey_to_l(as_int32)).tolist() == [[0, 0, 1, 128, 255]]  # clipped to 16 bits


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no JPEG/PNG/WebP"):
        find_images(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="could be read"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_images(find_images(tmp_path / "bad"), progress=False)


def _draws(n: int, seed: int) -> torch.Tensor:
    """The uniform numbers augment_batch draws for a batch of n with a generator seeded `seed`."""
    return torch.rand(n, 6, generator=torch.Generator().manual_seed(seed))


def test_augmentation_is_seeded_and_keeps_identity_when_not_cropping():
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    u = _draws(16, 1)
    untouched = (u[:, 0] >= 0.5) & (u[:, 5] >= 0.5)
    flipped_only = (u[:, 0] >= 0.5) & (u[:, 5] < 0.5)
    assert untouched.any() and flipped_only.any()
    torch.testing.assert_close(a[untouched], x[untouched], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[flipped_only], x[flipped_only].flip(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["shift", "flip"])
def test_shift_and_flip_augmentations_only_move_pixels(mode):
    size = 8
    x = torch.rand(32, 3, size, size) * 2 - 1
    out = augment_batch(x, torch.Generator().manual_seed(3), mode)
    u = _draws(32, 3)
    crop, flip = u[:, 0] < 0.5, u[:, 5] < 0.5
    assert crop.any() and (~crop).any() and flip.any() and (~flip).any()
    shift = (torch.floor(u[:, 3:5] * (2 * SHIFT_PIXELS + 1)) - SHIFT_PIXELS).long()
    if mode == "flip":
        shift.zero_()
    shift[~crop] = 0
    assert mode == "flip" or (shift != 0).any()
    positions = torch.arange(size)
    for i in range(32):  # output pixel (r, c) is input pixel (r + dy, c' + dx), edges repeated
        cols = (positions.flip(0) if flip[i] else positions) + shift[i, 0]
        rows = positions + shift[i, 1]
        expected = x[i][:, rows.clamp(0, size - 1)][:, :, cols.clamp(0, size - 1)]
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)


def test_resized_crops_resample_and_an_unknown_augmentation_is_refused():
    x = torch.rand(32, 3, 8, 8) * 2 - 1
    out = augment_batch(x, torch.Generator().manual_seed(3))
    cropped = _draws(32, 3)[:, 0] < 0.5
    # a resampled crop mixes neighbouring pixels: values that are in no input pixel
    assert all(not torch.isin(out[i], x[i]).all() for i in torch.nonzero(cropped).flatten().tolist())
    with pytest.raises(ValueError, match="unknown augmentation 'blur'"):
        augment_batch(x, torch.Generator(), "blur")
