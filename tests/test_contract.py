"""The host contract: every error message, the base order, and the Cosmos-style adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPE, TwoPhaseMethod
from torch import nn

from distill_mixins import (
    DenoiseAdapterMixin,
    DiffusionHost,
    DistillationCoreMixin,
    DistillConfig,
    TrigFlowMixin,
)
from distill_mixins.testing import MLPDenoiser


class Host(nn.Module):
    scaling = "edm"
    prediction_type = "eps"
    sigma_data = 0.5

    def __init__(self, width: int = 4):
        super().__init__()
        self.net = nn.Linear(width, width)

    def predict(self, net, x, time, condition):
        return net(x)

    def get_data_and_condition(self, batch):
        return batch, None, None


def test_valid_composition_satisfies_the_protocol():
    class Good(TwoPhaseMethod, Host):
        pass

    model = Good(distill=DistillConfig())
    assert isinstance(model, DiffusionHost)


def test_explicit_three_way_form_works():
    class Explicit(TwoPhaseMethod, DistillationCoreMixin, TrigFlowMixin, Host):
        pass

    assert isinstance(Explicit(width=4).net_teacher, nn.Linear)


@pytest.mark.parametrize("member", ["predict", "get_data_and_condition"])
def test_missing_method_fails_at_class_creation(member):
    namespace = {k: v for k, v in vars(Host).items() if k != member}
    Partial = type("PartialHost", (nn.Module,), namespace)
    with pytest.raises(TypeError, match=rf"PartialDistill .*lacks `{member}`.*Add a method `{member}\("):
        type("PartialDistill", (TwoPhaseMethod, Partial), {})


def test_predict_must_take_the_network():
    class OldStyle(Host):
        def predict(self, x, time, condition):
            return self.net(x)

    with pytest.raises(TypeError, match=r"must take \(self, net, x, time, condition\)"):

        class Bad(TwoPhaseMethod, OldStyle):
            pass


def test_host_before_mixin_fails_and_shows_the_order():
    with pytest.raises(TypeError, match=r"List the mixins first: class Bad\(TwoPhaseMethod, Host\)"):

        class Bad(Host, TwoPhaseMethod):
            pass


@pytest.mark.parametrize(
    ("member", "value", "message"),
    [
        ("scaling", "vp", "scaling='vp' is not supported; use one of edm, rectified_flow, trigflow"),
        ("prediction_type", "score", "prediction_type='score' is not supported"),
        ("sigma_data", 0.0, "sigma_data=0.0 must be a float > 0"),
        ("sigma_data", "0.5", "sigma_data='0.5' must be a float > 0"),
    ],
)
def test_bad_attribute_values_fail_at_construction(member, value, message):
    class Odd(TwoPhaseMethod, Host):
        pass

    setattr(Odd, member, value)
    with pytest.raises(TypeError, match=message):
        Odd()


@pytest.mark.parametrize("member", ["net", "scaling", "prediction_type", "sigma_data"])
def test_missing_attribute_fails_at_construction(member):
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            if member != "net":
                self.net = nn.Linear(2, 2)
            for name, value in (("scaling", "edm"), ("prediction_type", "x0"), ("sigma_data", 0.5)):
                if name != member:
                    setattr(self, name, value)

        def predict(self, net, x, time, condition):
            return net(x)

        def get_data_and_condition(self, batch):
            return batch, None, None

    class Distill(TwoPhaseMethod, Bare):
        pass

    with pytest.raises(TypeError, match=rf"Distill .*lacks `{member}`"):
        Distill()


def test_net_must_be_a_module_and_host_must_be_a_module():
    class NotModuleNet(Host):
        def __init__(self):
            super().__init__()
            del self.net
            self.net = lambda x: x

    class Distill(TwoPhaseMethod, NotModuleNet):
        pass

    with pytest.raises(TypeError, match="net must be an nn.Module"):
        Distill()

    class PlainHost:
        net = nn.Linear(2, 2)
        scaling, prediction_type, sigma_data = "edm", "x0", 0.5

        def predict(self, net, x, time, condition):
            return net(x)

        def get_data_and_condition(self, batch):
            return batch, None, None

    class Distill2(TwoPhaseMethod, PlainHost):
        pass

    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        Distill2()


def test_wrong_config_type_is_named():
    class Good(TwoPhaseMethod, Host):
        config_class = DistillConfig

    with pytest.raises(TypeError, match=r"distill=\.\.\.\) needs a DistillConfig, got dict"):
        Good(distill={"student_update_freq": 5})


def test_a_method_is_required_to_train():
    class NoMethod(DistillationCoreMixin, Host):
        pass

    model = NoMethod()
    with pytest.raises(NotImplementedError, match="without a method"):
        model.training_step(torch.zeros(2, 4), 0)


class CosmosStyleHost(nn.Module):
    """A Cosmos-style model: only denoise(x, sigma, condition) using self.net, returning x0 in `.x0`."""

    scaling = "edm"
    sigma_data = 0.5

    def __init__(self):
        super().__init__()
        self.net = MLPDenoiser(SHAPE, "edm_x0", num_labels=2, hidden=16, depth=1)

    def denoise(self, x, sigma, condition):
        class Prediction:
            x0 = self.net(x, sigma, condition)

        return Prediction()

    def get_data_and_condition(self, batch):
        return batch["x0"], batch["label"], torch.full_like(batch["label"], -1)


def test_cosmos_style_host_through_the_denoise_adapter():
    class CosmosDistill(TwoPhaseMethod, DenoiseAdapterMixin, CosmosStyleHost):
        pass

    model = CosmosDistill()
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.1)
    x, sigma, label = torch.randn(3, *SHAPE), torch.full((3,), 2.0), torch.tensor([0, 1, -1])
    assert torch.allclose(model.predict(model.net_teacher, x, sigma, label), model.net_teacher(x, sigma, label))
    assert torch.allclose(model.predict(model.net, x, sigma, label), model.net(x, sigma, label))
    assert model._modules["net"] is not model.net_teacher  # the binding is restored
    assert not torch.allclose(model.net(x, sigma, label), model.net_teacher(x, sigma, label))


def test_shadowed_host_members_are_reported():
    class HostWithGenerate(Host):
        def generate(self, batch):
            return batch

    with pytest.warns(UserWarning, match=r"replace the host's generate"):

        class Shadowing(TwoPhaseMethod, HostWithGenerate):
            pass


def test_intended_overrides_do_not_warn(recwarn):
    class HostWithOwnStep(Host):
        def training_step(self, batch, iteration):
            return {}, torch.zeros(())

        def denoise(self, x, sigma, condition):  # Cosmos-style hosts keep their own denoise
            return x

    class Fine(TwoPhaseMethod, HostWithOwnStep):
        pass

    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    assert Fine().denoise(1, 2, 3) == 1


def test_host_init_may_call_train_and_eval():
    class SelfEvaluatingHost(Host):
        def __init__(self):
            super().__init__()
            self.eval()  # runs the mixin's train() before the distillation networks exist

    class Distill(TwoPhaseMethod, SelfEvaluatingHost):
        pass

    model = Distill().train()
    assert model.net.training and not model.net_teacher.training


def test_predict_with_an_optional_extra_argument_is_still_old_style():
    class OldStyleWithDefault(Host):
        def predict(self, x, time, condition, guidance=None):
            return self.net(x)

    with pytest.raises(TypeError, match=r"must take \(self, net, x, time, condition\)"):

        class Bad(TwoPhaseMethod, OldStyleWithDefault):
            pass


def test_denoise_adapter_needs_a_denoise_method():
    class NoDenoise(nn.Module):
        scaling, sigma_data = "edm", 0.5

        def get_data_and_condition(self, batch):
            return batch, None, None

    with pytest.raises(TypeError, match=r"uses DenoiseAdapterMixin but its host has no `denoise"):

        class Bad(TwoPhaseMethod, DenoiseAdapterMixin, NoDenoise):
            pass


def test_host_owned_distillation_networks_are_refused():
    class HostWithEMA(Host):
        def __init__(self):
            super().__init__()
            self.net_ema = nn.Linear(4, 4)

    class Distill(TwoPhaseMethod, HostWithEMA):
        pass

    with pytest.raises(TypeError, match=r"host already sets net_ema"):
        Distill()
