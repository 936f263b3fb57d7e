"""Training objectives (ldm/unet/objective.py and its parts): each one's math against an independent float64 formula
written here, today's loss unchanged under the default config, the loss mask's reduction, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.unet.losses import reduce_per_sample
from ldm.unet.objective import NoiseConfig, build_noise_scheduler, denoising_error, diffusion_loss, predict
from ldm.unet.presets import build_unet


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    """A random float32 U-Net small enough for a forward in well under a second."""
    torch.manual_seed(0)
    return build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32)


def _batch(seed: int = 0, b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 77, 32, generator=g)


def test_the_default_loss_is_todays_bit_for_bit(unet):
    """The loss as it was before the objectives (issue 28), written out: eps = randn, t = randint, then the mean
    squared eps error. Every new option off must give this exact number from the same RNG state."""
    x0, text = _batch()
    scheduler = build_noise_scheduler(NoiseConfig())
    torch.manual_seed(7)
    eps = torch.randn_like(x0)
    t = torch.randint(0, 1000, (x0.shape[0],))
    pred = unet(scheduler.add_noise(x0, eps, t), t, encoder_hidden_states=text).sample
    expected = F.mse_loss(pred.float(), eps.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
    torch.manual_seed(7)
    loss = diffusion_loss(unet, scheduler, x0, text, NoiseConfig())
    assert torch.equal(loss, expected)
    after = torch.get_rng_state()  # and it drew exactly what the formula did
    torch.manual_seed(7)
    torch.randn_like(x0), torch.randint(0, 1000, (3,))
    assert torch.equal(after, torch.get_rng_state())


def test_a_mask_of_ones_is_the_mean_and_a_mask_weighs_elements():
    g = torch.Generator().manual_seed(1)
    err = torch.rand(2, 4, 3, 5, generator=g, dtype=torch.float64)
    assert torch.equal(reduce_per_sample(err), err.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(reduce_per_sample(err, torch.ones(2, 1, 3, 5, dtype=torch.float64)),
                               err.mean(dim=(1, 2, 3)), rtol=1e-15, atol=0)
    mask = torch.rand(2, 1, 3, 5, generator=g, dtype=torch.float64)
    mask[1] = 0  # sample 1: nothing counts -> 0, not nan
    expected = [sum(err[0, c, i, j] * mask[0, 0, i, j] for c in range(4) for i in range(3) for j in range(5))
                / (4 * mask[0].sum()), 0.0]
    torch.testing.assert_close(reduce_per_sample(err, mask), torch.tensor(expected, dtype=torch.float64))
    binary = (torch.arange(15).view(1, 1, 3, 5) < 6).double().expand(2, 1, 3, 5)  # the first 6 latent pixels
    torch.testing.assert_close(reduce_per_sample(err, binary), err.flatten(2)[:, :, :6].mean(dim=(1, 2)))
    with pytest.raises(ValueError, match=r"\(B, 1, h, w\)"):
        reduce_per_sample(err, torch.ones(2, 4, 3, 5))


def test_the_mask_reaches_the_loss():
    x0, eps, text = _draws(b=3)
    unet = Stub()
    cfg = NoiseConfig()
    scheduler = build_noise_scheduler(cfg)
    t = torch.tensor([10, 500, 990])
    mse, _ = denoising_error(unet, scheduler, x0, eps, t, text, cfg)
    ones, _ = denoising_error(unet, scheduler, x0, eps, t, text, cfg, mask=torch.ones(3, 1, 3, 3))
    zeros, _ = denoising_error(unet, scheduler, x0, eps, t, text, cfg, mask=torch.zeros(3, 1, 3, 3))
    torch.testing.assert_close(ones, mse, rtol=1e-14, atol=0)  # float64 sums in another order
    assert torch.equal(zeros, torch.zeros(3))
    torch.manual_seed(3)
    masked = diffusion_loss(unet, scheduler, x0, text, cfg, mask=torch.zeros(3, 1, 3, 3))
    assert masked.item() == 0.0


# ---------------------------------------------------------------------------------- each objective's math, float64

class Stub(torch.nn.Module):
    """A float64 'U-Net' whose prediction is a fixed function of its input and timestep, recording both."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, encoder_hidden_states=None, **_):
        from types import SimpleNamespace

        self.seen.append((x, t))
        return SimpleNamespace(sample=self.scale * x + 1e-3 * t.double().view(-1, 1, 1, 1))


def _draws(b: int = 5, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64)
    return x0, eps, torch.randn(b, 77, 8, generator=g, dtype=torch.float64)


def _alpha_bar(cfg: NoiseConfig) -> torch.Tensor:
    """SD's scaled-linear alpha_bar in float64, and Lin et al. 2023's Algorithm 1 under zero_terminal_snr."""
    betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps,
                           dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    if cfg.zero_terminal_snr:
        s = alpha_bar.sqrt()
        s0, sT = s[0].clone(), s[-1].clone()
        s = (s - sT) * s0 / (s0 - sT)  # shift to 0 at T, scale back to s0 at 0
        alpha_bar_rescaled = s ** 2
        alphas = torch.cat([alpha_bar_rescaled[:1], alpha_bar_rescaled[1:] / alpha_bar_rescaled[:-1]])
        alpha_bar = torch.cumprod(alphas, 0)
    return alpha_bar


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "mode", "cosmap"])
def test_timestep_densities_are_sd3s_formulas(kind):
    import math

    from ldm.unet.timesteps import sample_fraction, sample_timesteps

    torch.manual_seed(4)
    u = sample_fraction(2000, torch.device("cpu"), kind, logit_mean=0.5, logit_std=0.8, mode_scale=1.29).double()
    torch.manual_seed(4)
    if kind == "logit_normal":
        n = torch.randn(2000).double()
        expected = 1 / (1 + torch.exp(-(0.5 + 0.8 * n)))
    else:
        v = torch.rand(2000).double()
        expected = {"uniform": v, "mode": 1 - v - 1.29 * (torch.cos(math.pi / 2 * v) ** 2 - 1 + v),
                    "cosmap": 1 - 1 / (torch.tan(math.pi / 2 * v) + 1)}[kind]
    torch.testing.assert_close(u, expected, rtol=0, atol=1e-6)  # float32 draws and arithmetic vs float64
    assert 0 <= u.min() and u.max() <= 1
    if kind == "logit_normal":  # the median is sigmoid(m)
        assert u.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.02)
    cfg = NoiseConfig(timestep_sampling=kind, logit_mean=0.5, logit_std=0.8)
    torch.manual_seed(4)
    t = sample_timesteps(2000, torch.device("cpu"), cfg)
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() <= 999
    torch.manual_seed(4)
    flow = sample_timesteps(2000, torch.device("cpu"), NoiseConfig(prediction_type="flow", timestep_sampling=kind,
                                                                   logit_mean=0.5, logit_std=0.8))
    if kind != "uniform":  # (DDPM's uniform draw is torch.randint, as before)
        assert torch.equal(t, (flow.double()).floor().long().clamp(max=999))  # the same u, floor(u T)


@pytest.mark.parametrize("kind", ["huber", "pseudo_huber"])
def test_huber_losses_match_their_formulas(kind):
    from ldm.unet.losses import elementwise_loss

    g = torch.Generator().manual_seed(0)
    pred, target = 2 * torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.zeros(3, 4, 5, 5,
                                                                                               dtype=torch.float64)
    c = torch.tensor([0.05, 0.3, 1.0], dtype=torch.float64)
    got = elementwise_loss(pred, target, kind, c)
    for i in range(3):
        if kind == "huber":  # 2 x torch's Huber loss: d^2 / 2 inside delta, delta (|d| - delta / 2) outside
            expected = 2 * F.huber_loss(pred[i], target[i], delta=float(c[i]), reduction="none")
        else:  # the Charbonnier form: 2 c^2 (sqrt(1 + (d / c)^2) - 1)
            expected = 2 * c[i] ** 2 * (torch.sqrt(1 + ((pred[i] - target[i]) / c[i]) ** 2) - 1)
        torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-14)
    small = torch.full((1, 1, 1, 1), 1e-4, dtype=torch.float64)  # both are d^2 near 0
    assert elementwise_loss(small, small * 0, kind, torch.tensor([0.1])).item() == pytest.approx(1e-8, rel=1e-3)


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_schedules_are_kohyas(schedule):
    import math

    from ldm.unet.losses import LossConfig, huber_threshold

    t = torch.tensor([0, 100, 500, 999])
    alpha_bar = _alpha_bar(NoiseConfig())[t]
    snr = alpha_bar / (1 - alpha_bar)
    got = huber_threshold(LossConfig(huber_c=0.1, huber_schedule=schedule), t, snr, 1000)
    if schedule == "constant":
        expected = torch.full((4,), 0.1, dtype=torch.float64)
    elif schedule == "exponential":  # kohya: alpha = -ln(c) / T, c_t = exp(-alpha t)
        expected = torch.exp(-(-math.log(0.1) / 1000) * t.double())
    else:  # kohya: sigma = sqrt((1 - alpha_bar) / alpha_bar), c_t = (1 - c) / (1 + sigma)^2 + c
        expected = 0.9 / (1 + ((1 - alpha_bar) / alpha_bar).sqrt()) ** 2 + 0.1
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("weighting", ["debiased", "p2"])
def test_weightings_match_their_formulas(weighting, prediction_type):
    """Through `denoising_error`, with a float64 stub U-Net: loss (B,) and weight (B,) against the formulas."""
    from ldm.unet.losses import LossConfig

    x0, eps, text = _draws()
    t = torch.tensor([0, 3, 250, 700, 999])
    cfg = NoiseConfig(prediction_type=prediction_type)
    loss_cfg = LossConfig(weighting=weighting, p2_k=1.0, p2_gamma=0.5)
    err, weight = denoising_error(Stub(), build_noise_scheduler(cfg), x0, eps, t, text, cfg, loss=loss_cfg)
    a = _alpha_bar(cfg)[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    pred = 0.3 * x_t + 1e-3 * t.double().view(-1, 1, 1, 1)
    torch.testing.assert_close(err, ((pred - target) ** 2).mean(dim=(1, 2, 3)), rtol=1e-6, atol=0)
    snr = (a / (1 - a)).flatten()
    if weighting == "debiased":  # kohya's apply_debiased_estimation: SNR clipped at 1000
        snr = snr.clamp(max=1000)
        expected = 1 / snr.sqrt() if prediction_type == "epsilon" else 1 / (snr + 1)
    else:  # P2 on the eps error; a v error is (SNR + 1) / SNR times the eps error it implies
        expected = (1 + snr) ** -0.5 * (1 if prediction_type == "epsilon" else snr / (snr + 1))
    # diffusers' alphas_cumprod is float32: at t = 0, 1 - alpha_bar = 8.5e-4 carries a relative error of up to
    # 6e-8 / 8.5e-4 = 7e-5, so SNR does, and SNR^-1/2 half that
    torch.testing.assert_close(weight, expected, rtol=1e-4, atol=0)


def test_zero_terminal_snr_is_lin_et_al_algorithm_1():
    cfg = NoiseConfig(prediction_type="v_prediction", zero_terminal_snr=True)
    scheduler = build_noise_scheduler(cfg)
    expected = _alpha_bar(cfg)
    assert expected[-1] == 0 and scheduler.alphas_cumprod[-1] == 0  # the last timestep is pure noise
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), expected, rtol=1e-5, atol=1e-9)
    assert scheduler.config.timestep_spacing == "trailing" and scheduler.config.rescale_betas_zero_snr is True
    # the v target at t = T - 1 is -x0: the model must produce the image from pure noise
    x0, eps, text = _draws(b=2)
    stub = Stub()
    t = torch.tensor([999, 999])
    _, target = predict(stub, scheduler, x0, eps, t, text, cfg)
    torch.testing.assert_close(target, -x0)
    torch.testing.assert_close(stub.seen[0][0], eps)


def test_immiscible_assignment_is_the_cheapest_permutation():
    from itertools import permutations

    from ldm.unet.immiscible import assign_noise

    x0, eps, _ = _draws(b=6, seed=5)
    eps = eps + torch.linspace(-2, 2, 6, dtype=torch.float64).view(-1, 1, 1, 1)  # so the order matters
    got = assign_noise(x0, eps)

    def cost(p) -> float:
        return sum(float(((x0[i] - eps[j]) ** 2).sum()) for i, j in enumerate(p))

    best = min(permutations(range(6)), key=cost)
    assert torch.equal(got, eps[list(best)])
    assert cost(best) < cost(range(6))  # the test data has something to reorder
    assert sorted(got.flatten().tolist()) == sorted(eps.flatten().tolist())  # a permutation: the same noise


def test_flow_matching_is_the_straight_line_with_a_velocity_target():
    x0, eps, text = _draws()
    cfg = NoiseConfig(prediction_type="flow")
    scheduler = build_noise_scheduler(cfg)
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and scheduler.config.shift == 1.0
    t = torch.tensor([0.0, 1.0, 250.5, 700.0, 1000.0])
    stub = Stub()
    pred, target = predict(stub, scheduler, x0, eps, t, text, cfg)
    sigma = (t.double() / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(stub.seen[0][0], (1 - sigma) * x0 + sigma * eps, rtol=1e-15, atol=1e-15)
    assert torch.equal(stub.seen[0][1], t)  # the U-Net sees sigma * T, as FlowMatchEulerDiscreteScheduler gives it
    torch.testing.assert_close(target, eps - x0, rtol=0, atol=0)
    # the draws: sigma * T in [0, T), floats
    torch.manual_seed(0)
    loss = diffusion_loss(stub, scheduler, x0, text, cfg)
    drawn = stub.seen[-1][1]
    assert drawn.dtype == torch.float32 and 0 <= drawn.min() and drawn.max() < 1000 and loss.item() > 0


@pytest.mark.parametrize("overrides, message", [
    (["noise.zero_terminal_snr=true"], "noise.zero_terminal_snr.*needs noise.prediction_type=v_prediction"),
    (["noise.prediction_type=flow", "noise.min_snr_gamma=5"], "noise.min_snr_gamma.*flow"),
    (["noise.prediction_type=flow", "noise.zero_terminal_snr=true"], "noise.zero_terminal_snr"),
    (["noise.prediction_type=flow", "loss.weighting=debiased"], "loss.weighting.*flow"),
    (["noise.min_snr_gamma=5", "loss.weighting=p2"], "two weightings"),
    (["noise.prediction_type=flow", "sample.sampler=ddim"], "sample.sampler.*euler"),
    (["loss.huber_c=0"], "loss.huber_c"),
    (["noise.timestep_sampling=lognormal"], "timestep_sampling"),
])
def test_bad_combinations_are_refused_at_config_load(overrides, message):
    from pathlib import Path

    from ldm.config import load_config
    from ldm.errors import UserError
    from ldm.unet.config import LDMConfig

    config = Path(__file__).resolve().parents[1] / "configs/ldm/tiny.yaml"
    with pytest.raises(UserError, match=message) as info:
        load_config(LDMConfig, config, overrides)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- resume, end to end

OBJECTIVES = {
    "ztsnr": ["noise.prediction_type=v_prediction", "noise.zero_terminal_snr=true", "noise.timestep_sampling=logit_normal",
              "noise.immiscible=true", "loss.type=pseudo_huber", "loss.huber_schedule=snr", "loss.weighting=debiased"],
    "flow": ["noise.prediction_type=flow", "noise.timestep_sampling=mode", "noise.immiscible=true", "loss.type=huber",
             "loss.huber_schedule=exponential", "sample.sampler=euler"],
    "p2-cosmap": ["noise.timestep_sampling=cosmap", "loss.weighting=p2", "noise.offset_noise=0.1",
                  "noise.input_perturbation=0.1"],
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_an_objective_draws_only_from_the_restored_rng(objective):
    """What resume relies on: a loss step depends on nothing but the weights and the global RNG state a checkpoint
    restores. 4 steps in a row against 2, a restore of (weights, RNG) after other draws, and 2 more."""
    from ldm.config import load_config
    from ldm.unet.config import LDMConfig

    cfg = load_config(LDMConfig, None, ["text_encoder.path=x", *OBJECTIVES[objective]])
    scheduler = build_noise_scheduler(cfg.noise)
    x0, _, text = _draws(b=4)

    def steps(stub: Stub, n: int) -> None:
        opt = torch.optim.SGD(stub.parameters(), lr=0.1)
        for _ in range(n):
            diffusion_loss(stub, scheduler, x0, text, cfg.noise, cfg.loss).backward()
            opt.step()
            opt.zero_grad()

    torch.manual_seed(0)
    straight = Stub()
    steps(straight, 4)
    torch.manual_seed(0)
    resumed = Stub()
    steps(resumed, 2)
    saved = {k: v.clone() for k, v in resumed.state_dict().items()}, torch.get_rng_state()
    torch.randn(100)  # the process that resumes has drawn other numbers
    resumed = Stub()
    resumed.load_state_dict(saved[0])
    torch.set_rng_state(saved[1])
    steps(resumed, 2)
    assert torch.equal(straight.scale, resumed.scale) and straight.scale.item() != 0.3


@pytest.mark.slow
def test_resume_is_bit_exact_with_flow_matching(tmp_path_factory, fresh_accelerate):
    """train_ldm.py end to end with the objective furthest from the default (float timesteps, another scheduler, its
    validation loss and samples, immiscible noise): a run killed at step 2 and resumed ends with the weights and
    validation losses of an uninterrupted one. (Each objective's RNG use: the test above.)"""
    objective = "flow"
    import json
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from conftest import reset_accelerate_state
    from ldm.unet.tiny import write_tiny_stage2_inputs

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "train"))
    import train_ldm

    tmp = tmp_path_factory.mktemp(objective)
    parts = write_tiny_stage2_inputs(tmp / "parts", num_images=16)

    def train(out: Path, steps: int, resume: str | None = None) -> None:
        train_ldm.main(["--config", str(root / "configs/ldm/tiny.yaml"), f"train.output_dir={out}",
                        f"data.path={parts['data']}", f"cache.vae={parts['vae']}", f"text_encoder.path={parts['text']}",
                        f"cache.dir={tmp / 'latents'}", "train.report_to=none", "train.batch_size=4",
                        "train.checkpoint_every=2", "optim.warmup_steps=1", "data.num_val=4", "train.val_every=2",
                        "sample.every=4" if objective == "flow" else "sample.every=0", "sample.steps=2",
                        "sample.prompts=[a red circle]", f"train.max_steps={steps}",
                        *OBJECTIVES[objective]] + (["--resume", resume] if resume else []))
        reset_accelerate_state()

    train(tmp / "a", 4)
    train(tmp / "b", 2)
    train(tmp / "b", 4, resume="latest")

    def weights(out: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted((out / "checkpoints/step-00000004").rglob("*.safetensors"))
                if not f.name.startswith("rng") for k, v in load_file(f).items()}

    a, b = weights(tmp / "a"), weights(tmp / "b")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    rows = [(tmp / run / "checkpoints/val_loss.jsonl").read_text() for run in "ab"]
    assert rows[0] == rows[1] and "mse" in json.loads(rows[0].splitlines()[-1])["raw"]
