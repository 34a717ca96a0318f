"""Teacher ensembles: one Net whose logits, CAM and BatchNorm layers are its members' (EDC's relabelling)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from nrrdd import NrrddError
from nrrdd.checkpoint import load_model, read_meta, save_model
from nrrdd.cli import main
from nrrdd.config import StudentConfig, preset_config
from nrrdd.distill import distill
from nrrdd.evaluate import evaluate
from nrrdd.losses import BNStats
from nrrdd.models import Net, create_model, merge_nets, model_names


def _linear_net(weight, bias, pooled=False) -> Net:
    head = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        head.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return Net(nn.Identity(), head, pooled=pooled)


def test_merged_logits_are_the_members_mean_by_hand():
    # x = 1: net a gives [1*1 + 0, 2*1 + 1] = [1, 3]; net b [3 + 2, -2 + 1] = [5, -1]; the mean is [3, 1]
    a, b = _linear_net([[1.0], [2.0]], [0.0, 1.0]), _linear_net([[3.0], [-2.0]], [2.0, 1.0])
    x = torch.ones(1, 1, 1, 1)
    assert merge_nets([a, b])(x).tolist() == [[3.0, 1.0]]


@pytest.mark.parametrize("pooled", [False, True])
def test_merged_net_is_the_mean_of_its_members_and_so_is_its_cam(pooled):
    torch.manual_seed(0)
    if pooled:
        nets = [Net(nn.Conv2d(3, k, 3, padding=1), nn.Linear(k, 4), pooled=True) for k in (5, 7)]
    else:
        nets = [create_model("convnet3", 4, 16, 3, width=w) for w in (8, 12)]
    for n in nets:
        n.eval()
    ens = merge_nets(nets).eval()
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        assert torch.allclose(ens(x), torch.stack([n(x) for n in nets]).mean(0), atol=1e-5)

        def raw_cam(n):  # Eq. 1 before upsampling and per-image normalisation
            f = n.features(x)
            return (n.cam_weights(f.shape)[y] * f).sum(1)
        assert torch.allclose(raw_cam(ens), torch.stack([raw_cam(n) for n in nets]).mean(0), atol=1e-5)


def test_ensemble_holds_every_members_batchnorm():
    nets = [create_model("convnet3", 4, 16, 3, width=8) for _ in range(3)]
    assert len(BNStats(merge_nets(nets)).layers) == 3 * len(BNStats(nets[0]).layers) == 9


def test_an_ensemble_is_made_from_teachers_not_trained_by_name():
    assert "ensemble" not in model_names()
    with pytest.raises(NrrddError, match="ensemble-teachers"):
        create_model("ensemble", 10)


def test_members_that_pool_and_flatten_do_not_mix():
    with pytest.raises(NrrddError, match="pool"):
        merge_nets([_linear_net([[1.0]], [0.0], pooled=True), _linear_net([[1.0]], [0.0], pooled=False)])


def _teacher_file(path, seed, classes=("a", "b", "c"), mean=(0.5, 0.5, 0.5), size=16, width=8, arch="convnet3",
                  split_seed=0):
    torch.manual_seed(seed)
    net = create_model(arch, len(classes), size, 3, width=width)
    save_model(path, net, {"arch": arch, "classes": list(classes), "image_size": size, "channels": 3,
                           "mean": list(mean), "std": [0.25] * 3, "model_kwargs": {"width": width},
                           "val_acc": 50.0 + seed, "test_acc": 40.0 + seed,
                           "data_info": {"val_fraction": 0.1, "split_seed": split_seed}})
    return path


def test_ensemble_file_loads_as_one_teacher_computing_the_mean(tmp_path, capsys):
    paths = [_teacher_file(tmp_path / f"t{i}.safetensors", i) for i in range(2)]
    out = tmp_path / "ens.safetensors"
    assert main(["ensemble-teachers", *map(str, paths), "--out", str(out), "--device", "cpu"]) == 0
    assert "ensemble of 2 teachers" in capsys.readouterr().out
    ens, meta = load_model(out, classes=["a", "b", "c"])
    members = [load_model(p)[0] for p in paths]
    x = ens.normalize(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.allclose(ens(x), (members[0](x) + members[1](x)) / 2, atol=1e-5)
    assert meta["arch"] == "ensemble" and [m["val_acc"] for m in meta["members"]] == [50.0, 51.0]
    assert meta["members"][1]["sha256"] and meta["mean"] == [0.5] * 3
    # an existing file is never replaced without --overwrite, and then only an nrrdd checkpoint
    assert main(["ensemble-teachers", *map(str, paths), "--out", str(out)]) == 2
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["ensemble-teachers", *map(str, paths), "--out", str(tmp_path / "notes.txt"), "--overwrite"]) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("second, why", [
    ({"classes": ("a", "b", "z")}, "classes"),
    ({"mean": (0.4, 0.5, 0.5)}, "mean/std"),
    ({"size": 32}, "image_size"),
    ({"arch": "convnet4", "size": 16}, "feature maps"),
])
def test_teachers_that_disagree_are_refused_before_anything_is_written(tmp_path, capsys, second, why):
    a = _teacher_file(tmp_path / "a.safetensors", 0)
    b = _teacher_file(tmp_path / "b.safetensors", 1, **second)
    out = tmp_path / "ens.safetensors"
    assert main(["ensemble-teachers", str(a), str(b), "--out", str(out), "--device", "cpu"]) == 2
    assert why in capsys.readouterr().err and not out.exists()
    assert main(["ensemble-teachers", str(a), "--out", str(out)]) == 2  # one teacher is not an ensemble


def test_a_member_of_another_validation_split_is_warned_about_and_unrecorded(tmp_path, capsys):
    a = _teacher_file(tmp_path / "a.safetensors", 0)
    b = _teacher_file(tmp_path / "b.safetensors", 1, split_seed=3)
    assert main(["ensemble-teachers", str(a), str(b), "--out", str(tmp_path / "e.safetensors")]) == 0
    assert "validation images may be ones it saw" in capsys.readouterr().err
    assert read_meta(tmp_path / "e.safetensors")["data_info"] is None  # distill cannot vouch for its split
    assert main(["ensemble-teachers", str(a), str(a), "--out", str(tmp_path / "same.safetensors")]) == 0
    assert read_meta(tmp_path / "same.safetensors")["data_info"] == {"val_fraction": 0.1, "split_seed": 0}


def test_ensemble_teacher_distils_and_labels_students(tmp_path, digits, digits_teacher):
    """The whole pipeline takes an ensemble where it takes a teacher: selection, CAM, refinement, labels."""
    ens = tmp_path / "ens.safetensors"
    assert main(["ensemble-teachers", str(digits_teacher), str(digits_teacher), "--out", str(ens),
                 "--data", "digits", "--device", "cpu", "--quiet"]) == 0
    meta, single = read_meta(ens), read_meta(digits_teacher)
    # two copies of one teacher are that teacher: same accuracy
    assert meta["val_acc"] == pytest.approx(single["val_acc"], abs=1e-6)
    cfg = preset_config("nrrdd", {"iterations": 2, "ipc": 1, "pool_per_class": 10, "refine_batch": 10})
    rec = distill(digits, ens, cfg, tmp_path / "d", preset="nrrdd", device="cpu", progress=False)
    assert rec["teacher"]["arch"] == "ensemble" and len(rec["images"]) == 10
    r = evaluate(tmp_path / "d", StudentConfig(epochs=1, seeds=1, width=8), tmp_path / "e", device="cpu",
                 progress=False, data=digits)
    assert r["teacher_arch"] == "ensemble" and 0 <= r["val_mean"] <= 100
    assert json.loads((tmp_path / "e" / "results.json").read_text())["teacher"] == str(ens)
