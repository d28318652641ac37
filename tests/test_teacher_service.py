"""Teacher actors really serve the frozen teacher's logits (and features) through Ray."""

from __future__ import annotations

import pytest
import torch

from hpmkd.components.teacher_service import ActorTeachers, release, start_teacher_actors

from hpmkd.teachers import LocalTeachers, TeacherSpec
from hpmkd.models.ref import DataShape, ModelRef


def saved_teacher(tmp_path, name: str, model: str, seed: int):
    spec = TeacherSpec(name, ModelRef(model), DataShape(10, (1, 28, 28)))
    torch.manual_seed(seed)
    net = spec.model.build(spec.shape)
    # Give BatchNorm non-trivial running statistics so eval mode matters.
    net.train()
    with torch.no_grad():
        net(torch.randn(64, 1, 28, 28) * 2 + 0.5)
    path = tmp_path / f"{name}.pt"
    torch.save(net.state_dict(), path)
    return spec, net, path


def test_actors_serve_the_same_logits_as_the_local_models(ray_session, tmp_path):
    specs, nets, paths = zip(*(saved_teacher(tmp_path, n, m, s) for n, m, s in
                               [("a", "cnn_small", 0), ("b", "resnet8", 1)]))
    pools = start_teacher_actors(list(specs), [str(p) for p in paths], cpus=0.5, gpus=0.0)
    try:
        remote = ActorTeachers(["a", "b"], pools)
        local = LocalTeachers(["a", "b"], list(nets))
        x = torch.randn(32, 1, 28, 28)
        index = torch.arange(32)
        served = remote.request(x, index, [[], []])()
        expected = local.request(x, index, [[], []])()
        assert served.logits.shape == (2, 32, 10)
        torch.testing.assert_close(served.logits, expected.logits, rtol=0, atol=1e-5)
        # the two teachers really differ: the actors did not serve one model twice
        assert not torch.allclose(served.logits[0], served.logits[1])
        taps = [[nets[0].taps.feature_taps[-1]], []]
        with_feats = remote.request(x, index, taps)()
        name = taps[0][0]
        torch.testing.assert_close(with_feats.features[0][name], local.request(x, index, taps)().features[0][name],
                                   rtol=0, atol=1e-5)
        assert with_feats.features[1] == {}
    finally:
        release(pools)


def test_a_checkpoint_that_does_not_fit_names_the_layer_before_any_actor_starts(ray_session, tmp_path):
    spec, _, path = saved_teacher(tmp_path, "a", "cnn_small", 0)
    wrong = TeacherSpec("a", ModelRef("resnet8"), DataShape(10, (1, 28, 28)))
    with pytest.raises(ValueError) as info:
        start_teacher_actors([wrong], [str(path)], cpus=0.5, gpus=0.0)
    message = str(info.value)
    assert "different model" in message or "does not fit" in message
