"""Data prepared on the device: uint8 batches from the workers, resize / augmentation /
normalization batched in `on_after_batch_transfer`, equal to the per-image CPU transforms."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from met_lightning.data.base import InputSpec
from met_lightning.data.digits import DigitsDataModule, stratified_split
from met_lightning.data.image_folder import ImageFolderDataModule
from met_lightning.data.images import load_image
from met_lightning.data.lowres import lowres_to_tensor
from met_lightning.data.torchvision_data import TorchvisionDataModule
from met_lightning.data.transforms import (
    BatchTransform,
    augment_seed,
    crop_draws,
    eval_transform,
    interpolation_mode,
    resized_crop,
    sample_crops,
)
from met_lightning.data.vtab import Vtab1kDataModule
from met_lightning.errors import ConfigError
from tests.data_fixtures import VTAB_TASK, write_cifar100, write_image, write_vtab_task

SPEC = InputSpec((3, 48, 40), (0.1, 0.2, 0.3), (0.2, 0.25, 0.5), "bicubic")
TOL = dict(atol=1e-5, rtol=0.0)


def ready(dm):
    dm.setup()
    return dm


def prepared_split(dm, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Every batch of `loader` through the DataModule's eval path, concatenated."""
    out = [(dm.prepare_batch(x), y) for x, y in loader]
    return torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root, n_train=300, n_test=40)
    return root


def make_cifar(root, cls=None, **kwargs):
    """`data=cifar100`'s DataModule (or a subclass `cls`) on the 300 + 40 images of `root`."""
    kwargs = {"input_spec": SPEC, "val_fraction": 1 / 3, "batch_size": 16, "eval_batch_size": 16,
              **kwargs}  # fmt: skip
    return (cls or TorchvisionDataModule)(name="CIFAR100", root=str(root), **kwargs)


# ---------------------------------------------------------------------- eval = CPU transform
@pytest.mark.parametrize("normalize", ["backbone", "imagenet", "half", "none"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_cifar_eval_equals_cpu_transform(cifar_root, normalize, interpolation):
    spec = InputSpec(SPEC.input_size, SPEC.mean, SPEC.std, interpolation)
    dm = ready(make_cifar(cifar_root, normalize=normalize, augment=True, input_spec=spec))
    images, labels = prepared_split(dm, dm.test_dataloader())
    reference = eval_transform(spec, normalize)
    expected = torch.stack([reference(image) for image in dm.test_set.images])
    assert images.shape == (40, 3, 48, 40) and images.dtype == torch.float32
    torch.testing.assert_close(images, expected, **TOL)
    assert torch.equal(labels, dm.test_set.labels)


def test_cifar_grey_backbone_eval_equals_cpu_transform(cifar_root):
    spec = InputSpec((1, 32, 32), (0.5,), (0.5,), "bicubic")
    dm = ready(make_cifar(cifar_root, input_spec=spec))
    images, _ = prepared_split(dm, dm.val_dataloader())
    reference = v2.Compose([v2.Grayscale(1), eval_transform(spec)])  # the former CPU path
    expected = torch.stack([reference(image) for image in dm.val_set.images])
    assert images.shape == (100, 1, 32, 32)
    torch.testing.assert_close(images, expected, **TOL)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_digits_eval_equals_lowres_tensors(interpolation):
    spec = InputSpec((3, 32, 32), (0.5, 0.4, 0.3), (0.5, 0.6, 0.7), interpolation)
    dm = ready(DigitsDataModule(seed=3, batch_size=64, eval_batch_size=100, input_spec=spec))
    images, labels = prepared_split(dm, dm.test_dataloader())
    digits = load_digits()
    test = stratified_split(digits.target, 0.2, 0.2, 3)[2]
    expected = lowres_to_tensor(digits.images[test], spec.input_size, spec.mean, spec.std,
                                interpolation)  # fmt: skip
    torch.testing.assert_close(images, expected, **TOL)
    assert torch.equal(labels, torch.as_tensor(digits.target[test]))


def _write_mixed_folders(root, rng):
    """Class folders whose images differ in size (and one grey level image)."""
    for name in ("cat", "dog"):
        for i in range(10):
            size = 12 if i % 3 else 20
            write_image(root / name / f"{i}.png", rng, size=size, mode="L" if i == 5 else "RGB")


def test_image_folder_eval_equals_cpu_transform_with_mixed_sizes(tmp_path):
    _write_mixed_folders(tmp_path, np.random.default_rng(0))
    kwargs = dict(val_fraction=0.3, test_fraction=0.3, batch_size=4, eval_batch_size=2)
    dm = ready(ImageFolderDataModule(root=str(tmp_path), normalize="imagenet", input_spec=SPEC,
                                     **kwargs))  # fmt: skip
    reference = eval_transform(SPEC, "imagenet")
    kinds = {x.dtype for loader in (dm.val_dataloader(), dm.test_dataloader()) for x, _ in loader}
    assert kinds == {torch.uint8, torch.float32}  # mixed batches are resized in the worker
    for dataset, loader in ((dm.val_set, dm.val_dataloader()), (dm.test_set, dm.test_dataloader())):
        images, labels = prepared_split(dm, loader)
        expected = [reference(load_image(path, SPEC, "test")) for path, _ in dataset.samples]
        torch.testing.assert_close(images, torch.stack(expected), **TOL)
        assert labels.tolist() == dataset.targets


def test_vtab_eval_equals_cpu_transform(tmp_path):
    write_vtab_task(tmp_path)
    dm = ready(Vtab1kDataModule(root=str(tmp_path), task=VTAB_TASK, batch_size=4,
                                eval_batch_size=3, input_spec=SPEC))  # fmt: skip
    images, _ = prepared_split(dm, dm.test_dataloader())
    expected = [eval_transform(SPEC)(load_image(p, SPEC, "test")) for p, _ in dm.test_set.samples]
    torch.testing.assert_close(images, torch.stack(expected), **TOL)


# ---------------------------------------------------------------------- the workers' batches
def test_dataloaders_hand_over_uint8_at_the_stored_size(cifar_root, tmp_path):
    digits = ready(DigitsDataModule(batch_size=8, input_spec=SPEC))
    x, y = next(iter(digits.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (8, 1, 8, 8) and int(x.max()) <= 16
    assert y.dtype == torch.long
    cifar = ready(make_cifar(cifar_root, augment=True))
    for loader in (cifar.train_dataloader(), cifar.val_dataloader(), cifar.test_dataloader()):
        x, y = next(iter(loader))
        assert x.dtype == torch.uint8 and x.shape == (16, 3, 32, 32) and y.dtype == torch.long
    write_vtab_task(tmp_path)
    vtab = ready(Vtab1kDataModule(root=str(tmp_path), task=VTAB_TASK, batch_size=4,
                                  input_spec=SPEC))  # fmt: skip
    x, _ = next(iter(vtab.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 16, 16)


def test_mixed_sizes_are_resized_on_the_cpu_to_the_input(tmp_path):
    _write_mixed_folders(tmp_path, np.random.default_rng(1))
    dm = ready(ImageFolderDataModule(root=str(tmp_path), batch_size=12, val_fraction=0.2,
                                     test_fraction=0.1, input_spec=SPEC))  # fmt: skip
    x, _ = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 48, 40)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


# ---------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_resized_crop_equals_torchvision(interpolation):
    """The batched crop + resize + flip = torchvision's per-image resized_crop (+ flip)."""
    images = torch.rand(6, 3, 37, 29, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    top, left, crop_h, crop_w, flip = sample_crops(6, 37, 29, generator, images.device)
    mode = interpolation_mode(interpolation)
    for size in ((48, 40), (16, 12)):  # enlarging and shrinking (antialiased)
        out = resized_crop(images, top, left, crop_h, crop_w, size, mode.value, flip)
        for i in range(6):
            box = [int(v[i]) for v in (top, left, crop_h, crop_w)]
            ref = TF.resized_crop(images[i], *box, list(size), interpolation=mode, antialias=True)
            ref = TF.horizontal_flip(ref) if flip[i] else ref
            torch.testing.assert_close(out[i], ref, **TOL)


def test_crop_boxes_follow_random_resized_crop():
    generator = torch.Generator().manual_seed(0)
    top, left, h, w, flip = sample_crops(4000, 60, 50, generator, torch.device("cpu"))
    assert all(v.shape == (4000,) for v in (top, left, h, w, flip))
    assert bool((top >= 0).all() and (left >= 0).all())
    assert bool((top + h <= 60).all() and (left + w <= 50).all() and (h >= 1).all())
    area = h * w / (60 * 50)
    assert 0.07 <= float(area.min()) and float(area.max()) <= 1.0  # scale 0.08..1 (rounded)
    assert 0.4 < float(flip.float().mean()) < 0.6
    # the same distribution as torchvision's draws (rejected attempts favour small boxes)
    torch.manual_seed(0)
    image = torch.zeros(1, 60, 50)
    boxes = torch.tensor([RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                          for _ in range(4000)], dtype=torch.float32)  # fmt: skip
    ref_area = boxes[:, 2] * boxes[:, 3] / (60 * 50)
    assert float(area.mean()) == pytest.approx(float(ref_area.mean()), abs=0.02)
    assert float((h / w).log().mean()) == pytest.approx(
        float((boxes[:, 2] / boxes[:, 3]).log().mean()), abs=0.02
    )
    # no attempt fits (area 100 % of a 10 x 40 image at aspect >= 3/4): torchvision's centre crop
    top, left, h, w, _ = sample_crops(8, 40, 10, generator, torch.device("cpu"), scale=(1.0, 1.0))
    assert top.tolist() == [13.0] * 8 and left.tolist() == [0.0] * 8
    assert h.tolist() == [13.0] * 8 and w.tolist() == [10.0] * 8


def test_augmented_batches_range_and_determinism(cifar_root):
    dm = ready(make_cifar(cifar_root, augment=True, normalize="half"))
    x, _ = next(iter(dm.train_dataloader()))

    def draw(epoch, batch_idx):
        return dm.batch_transform.train(x, dm.train_generator(x.device, epoch, batch_idx))

    a = draw(0, 0)
    assert a.shape == (16, 3, 48, 40) and a.dtype == torch.float32
    assert -1.0 - 1e-6 <= float(a.min()) and float(a.max()) <= 1.0 + 1e-6  # (x - 0.5) / 0.5
    assert torch.equal(a, draw(0, 0))  # the same (seed, epoch, batch): the same crops
    assert not torch.equal(a, draw(0, 1)) and not torch.equal(a, draw(1, 0))
    assert not torch.equal(a, dm.prepare_batch(x))  # eval: no augmentation
    assert augment_seed(0, 0, 0, 1) != augment_seed(0, 1, 0, 0)  # DDP ranks draw differently
    other = ready(make_cifar(cifar_root, augment=True, normalize="half", seed=5))
    assert not torch.equal(a, other.batch_transform.train(x, other.train_generator("cpu", 0, 0)))


# ---------------------------------------------------------------------- in a real Trainer
class Recorder(L.LightningModule):
    """A linear classifier that records what each step receives."""

    def __init__(self, num_classes: int, features: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(features, num_classes)
        self.seen: list[tuple[str, int, int, torch.Tensor]] = []

    def _record(self, stage, batch, batch_idx):
        images = batch[0]
        self.seen.append((stage, self.current_epoch, batch_idx, images.detach().clone()))
        return self.head(images.flatten(1))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self._record("train", batch, batch_idx), batch[1])

    def validation_step(self, batch, batch_idx):
        self._record("val", batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self._record("test", batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return self._record("predict", batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class RecordingCifar(TorchvisionDataModule):
    """Records the (epoch, batch index) each training batch's generator is seeded with."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.drawn: list[tuple[int, int]] = []

    def train_generator(self, device, epoch, batch_idx):
        self.drawn.append((epoch, batch_idx))
        return super().train_generator(device, epoch, batch_idx)


def _fit(cifar_root, seed=0):
    L.seed_everything(seed)  # the sampler's order
    spec = InputSpec((3, 16, 16), (0.5,) * 3, (0.5,) * 3, "bicubic")
    dm = ready(make_cifar(cifar_root, RecordingCifar, augment=True, normalize="half",
                          input_spec=spec, seed=seed))  # fmt: skip
    module = Recorder(100, 3 * 16 * 16)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=3,
                        limit_val_batches=2, limit_test_batches=2, limit_predict_batches=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    trainer.predict(module, datamodule=dm)
    return dm, module


def test_trainer_steps_receive_prepared_batches(cifar_root):
    dm, module = _fit(cifar_root)
    stages = {stage for stage, *_ in module.seen}
    assert stages == {"train", "val", "test", "predict"}
    assert not dm.pins_memory()  # a CPU trainer
    for _, _, _, images in module.seen:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16)
        assert -1.0 - 1e-6 <= float(images.min()) and float(images.max()) <= 1.0 + 1e-6
    train = [(epoch, idx, x) for stage, epoch, idx, x in module.seen if stage == "train"]
    assert [(e, i) for e, i, _ in train] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert dm.drawn == [(epoch, idx) for epoch, idx, _ in train]  # the generator's seeds
    # evaluation batches = the eval transform of the raw loader batches, in order
    evals = [x for stage, _, _, x in module.seen if stage == "test"]
    expected = [dm.prepare_batch(x) for x, _ in dm.test_dataloader()][:2]
    for got, want in zip(evals, expected, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    predicted = [x for stage, _, _, x in module.seen if stage == "predict"]
    for got, want in zip(predicted, expected, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    # a second run with the same seed sees the same augmented batches; another seed does not
    _, again = _fit(cifar_root)
    same = [x for stage, _, _, x in again.seen if stage == "train"]
    assert all(torch.equal(a, b) for (_, _, a), b in zip(train, same, strict=True))
    assert not torch.equal(train[0][2], train[1][2])


# ---------------------------------------------------------------------- pin_memory
def test_pin_memory_auto_follows_the_trainers_device(cifar_root):
    dm = make_cifar(cifar_root)
    assert dm.pin_memory == "auto" and not dm.pins_memory()  # no trainer

    class Strategy:
        root_device = torch.device("cuda", 0)

    class GpuTrainer:
        strategy = Strategy()
        world_size = 1

    dm.trainer = GpuTrainer()
    assert dm.pins_memory()
    assert not make_cifar(cifar_root, pin_memory=False).pins_memory()
    assert make_cifar(cifar_root, pin_memory="true").pins_memory()
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match="data.pin_memory=.*auto.*true or false"):
            make_cifar(cifar_root, pin_memory=bad)


def test_batch_transform_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="resize mode 'area'"):
        BatchTransform(SPEC, mode="area")


# ---------------------------------------------------------------------- hot path
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero")


class SyncCounter(TorchDispatchMode):
    """Records the ops that force a device -> host sync (scalar reads, boolean-mask indexing)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        tensors = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        masked = name.startswith("aten::index") and any(t.dtype == torch.bool for t in tensors[1:])
        if name in SYNC_OPS or masked:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def test_batch_preparation_has_no_host_sync(cifar_root):
    dm = ready(make_cifar(cifar_root, augment=True))
    x, _ = next(iter(dm.train_dataloader()))
    generator = dm.train_generator(x.device, 0, 0)
    dm.batch_transform.stats(x.device)  # made once per device, before the hot path
    with SyncCounter() as counter:
        dm.batch_transform.train(x, generator)
        dm.batch_transform.eval(x)
    assert counter.syncs == []
    with SyncCounter() as counter:  # the counter sees a sync when there is one
        x.float().mean().item()
        x[x > 3]
    assert counter.syncs[0] == "aten::_local_scalar_dense" and len(counter.syncs) == 2


def test_batch_transforms_compile_fullgraph():
    """Eval and the augmentation (from its eager draws) compile without graph breaks."""
    bt = BatchTransform(SPEC, augment=True)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    bt.stats(x.device)
    draws = crop_draws(4, torch.Generator().manual_seed(3), x.device)
    augment = torch.compile(bt.augment_with, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(augment(x, draws), bt.augment_with(x, draws), **TOL)
    evaluate = torch.compile(bt.eval, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(evaluate(x), bt.eval(x), **TOL)
    assert torch.equal(bt.train(x, torch.Generator().manual_seed(3)), bt.augment_with(x, draws))
