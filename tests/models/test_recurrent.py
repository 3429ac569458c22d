import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from torch.nn.functional import log_softmax

from tests.common import assert_close
from vdn_pyro.data.text import PAD, Vocabulary, encode_texts
from vdn_pyro.inference import LocalELBO, fit
from vdn_pyro.models.recurrent import RecurrentVDN, evaluate_sequences

VOCAB = Vocabulary(tuple("abcde"))
TEXTS = ["abc", "a", "edcb", "bb"]
SMALL = dict(embed_dim=4, hidden=8, units=3, posterior_token_dim=3)
VARIANTS = {
    "vdn": {},
    "no-ar": {"ar": False},
    "lstm": {"cell": "lstm"},
    "plain-posterior": {"residual_posterior": False},
    "deterministic": {"deterministic": True},
    "path": {"posterior": "path", "posterior_context": 5},
    "path-plain": {"posterior": "path", "posterior_context": 5, "residual_posterior": False},
}


def make(**options):
    return RecurrentVDN(VOCAB, **{**SMALL, **options})


def batch(texts=TEXTS, max_len=None):
    return encode_texts(texts, VOCAB, max_len)


def latent_sites(trace):
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample" and n.startswith("rnn.z.")]
    return [n for n in names if not n.endswith(".units")]


def test_trace_sites_and_shapes():
    net = make()
    x, y = batch(max_len=7)  # lengths 4, 2, 5, 3 (boundary included); 2 all-padding columns
    guide_trace = poutine.trace(net.guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(net.model, trace=guide_trace)).get_trace(x, y)
    assert latent_sites(guide_trace) == latent_sites(model_trace) == [f"rnn.z.{t}" for t in range(5)]
    mask = y != PAD
    for t in range(5):
        for trace in (guide_trace, model_trace):
            site = trace.nodes[f"rnn.z.{t}"]
            assert site["value"].shape == (4, 3, 1)
            assert site["fn"].batch_shape == (4, 3) and site["fn"].event_shape == (1,)
            assert sorted(f.name for f in site["cond_indep_stack"]) == ["data", f"rnn.z.{t}.units"]
            assert site["mask"].shape == (4, 1) and site["mask"][:, 0].tolist() == mask[:, t].tolist()
            assert_close(site["scale"], torch.ones(3))  # beta (H,) on both sides
        # the model's prior at t is conditioned on the guide's z_{t-1}
        assert torch.equal(model_trace.nodes[f"rnn.z.{t}"]["value"], guide_trace.nodes[f"rnn.z.{t}"]["value"])
    obs = model_trace.nodes["obs"]
    assert obs["fn"].batch_shape == (4, 1) and obs["fn"].event_shape == (5,)
    assert obs["value"].shape == (4, 1, 5)
    draws = net.guide(x, y)  # the guide returns {site: value}
    assert list(draws) == [f"rnn.z.{t}" for t in range(5)]
    assert all(value.shape == (4, 3, 1) for value in draws.values())


def test_deterministic_has_no_latents():
    net = make(deterministic=True)
    x, y = batch()
    assert net.guide(x, y) == {}
    trace = poutine.trace(net.model).get_trace(x, y)
    assert [n for n, s in trace.nodes.items() if s["type"] == "sample"] == ["data", "obs"]
    assert net.units == 0 and not hasattr(net, "prior")


def _replay_row(net, guide_trace, row, length):
    """Model and guide traces of one unpadded sequence, with the padded batch's latents."""
    fake = poutine.Trace()
    for t in range(length if "rnn.z.0" in guide_trace else 0):
        value = guide_trace.nodes[f"rnn.z.{t}"]["value"][row : row + 1]  # (1, H, 1)
        fake.add_node(f"rnn.z.{t}", type="sample", is_observed=False, value=value, infer={})
    return fake


@pytest.mark.parametrize("variant", ["vdn", "lstm", "deterministic"])
def test_padding_contributes_nothing(variant):
    net = make(**VARIANTS[variant])
    x, y = batch(max_len=8)
    guide_trace = poutine.trace(net.guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(net.model, trace=guide_trace)).get_trace(x, y)
    padded = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
    total = 0.0
    for row, text in enumerate(TEXTS):
        xr, yr = batch([text])  # (1, len + 1), no padding at all
        fake = _replay_row(net, guide_trace, row, xr.shape[1])
        g = poutine.trace(poutine.replay(net.guide, trace=fake)).get_trace(xr, yr)
        m = poutine.trace(poutine.replay(net.model, trace=fake)).get_trace(xr, yr)
        total = total + m.log_prob_sum() - g.log_prob_sum()
    assert_close(padded, total, atol=1e-4, rtol=1e-5)
    # the padded positions would count without the mask
    obs = model_trace.nodes["obs"]
    unmasked = obs["fn"].base_dist.base_dist.log_prob(obs["value"]).sum().detach()
    assert abs(float(unmasked - obs["fn"].log_prob(obs["value"]).sum().detach())) > 1.0


def test_score_matches_unpadded_rows():
    net = make()
    x, y = batch(max_len=9)
    scores = net.score(x, y, "posterior_mean")
    assert scores.log_lik.shape == (1, 4, 5) and scores.kl.shape == (1, 4, 5, 3)
    assert bool((scores.log_lik[0][~scores.mask] == 0).all())
    for row, text in enumerate(TEXTS):
        single = net.score(*batch([text]), "posterior_mean")
        assert_close(scores.log_lik[0, row].sum(), single.log_lik.sum(), atol=1e-5)
        assert_close(scores.kl[0, row].sum(), single.kl.sum(), atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_reach_every_parameter(variant):
    net = make(**VARIANTS[variant])
    x, y = batch()
    loss = LocalELBO().differentiable_loss(net.model, net.guide, x, y, num_data=10)
    loss.backward()
    names = [n for n, p in net.named_parameters()]
    assert ("z.prior.raw_phi" in names) == (variant not in ("no-ar", "deterministic"))
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert float(param.grad.abs().sum()) > 0, name


ELBOS = {"trace": pyro.infer.Trace_ELBO, "mean-field": pyro.infer.TraceMeanField_ELBO, "local": LocalELBO}


def _unmoved(net, before):
    """Names of the parameters equal to their snapshot ``before``."""
    assert before, "the network has no parameters"
    return [name for name, param in net.named_parameters() if torch.equal(param.detach(), before[name])]


def _snapshot(net):
    return {name: param.detach().clone() for name, param in net.named_parameters()}


@pytest.mark.parametrize("elbo", list(ELBOS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stock_svi_trains_every_parameter(variant, elbo):
    pyro.clear_param_store()
    net = make(**VARIANTS[variant])
    x, y = batch()  # padded rows included
    svi = pyro.infer.SVI(net.model, net.guide, pyro.optim.Adam({"lr": 1e-2}), ELBOS[elbo]())
    before = _snapshot(net)
    for _ in range(3):
        assert math.isfinite(svi.step(x, y))
    assert _unmoved(net, before) == []
    # pyro.optim trained the network's own tensors, all of them found through the param store
    store = {id(value) for _, value in pyro.get_param_store().named_parameters()}
    assert store >= {id(param) for param in net.parameters()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_module_local_params_trains_every_parameter(variant):
    pyro.settings.set(module_local_params=True)  # before building: PyroModules read it then
    try:
        net = make(**VARIANTS[variant])
        x, y = batch()
        elbo = pyro.infer.Trace_ELBO()(net.model, net.guide)
        optim = torch.optim.Adam(elbo.parameters(), lr=1e-2)
        before = _snapshot(net)
        for _ in range(3):
            optim.zero_grad()
            loss = elbo(x, y)
            loss.backward()
            optim.step()
        assert math.isfinite(loss.item())
        assert _unmoved(net, before) == []
        assert len(pyro.get_param_store()) == 0  # the global store was never touched
    finally:
        pyro.settings.set(module_local_params=False)


def test_beta_buffer_is_the_layers_at_every_step():
    net = make()
    x, y = batch()
    assert net.beta is net.z.beta and net.z.site == "rnn.z" and net.site_names == ["rnn.z"]
    net.beta.copy_(torch.tensor([0.5, 2.0, 3.0]))  # in place, as KLBand does
    for side in (net.guide, net.model):
        trace = poutine.trace(side).get_trace(x, y)
        for name in latent_sites(trace):
            assert_close(trace.nodes[name]["scale"], torch.tensor([0.5, 2.0, 3.0]))


def test_units_use_the_shared_ar_prior():
    from vdn_pyro.models import ARPrior, find_neurons

    net = make()
    (layer,) = find_neurons(net)
    assert layer is net.z and isinstance(layer.prior, ARPrior) and layer.prior is net.prior
    assert net.prior.phi.shape == (3, 1) and net.prior.scale.shape == (3,)
    # the conditional prior of a step is N(phi z_{t-1} + W h_t + c, s^2), with phi and s the ARPrior's
    z_prev, h = torch.randn(4, 3), torch.randn(4, 8)
    loc, scale = net.prior.step(z_prev, h)
    assert_close(loc, net.prior.phi[:, 0] * z_prev + h @ net.prior.input.weight.T + net.prior.input.bias)
    assert_close(scale, net.prior.scale.expand(4, 3))
    net.prior.set_phi(torch.tensor([0.1, -0.2, 0.3]))  # what Persistence does
    assert_close(net.prior.phi[:, 0], torch.tensor([0.1, -0.2, 0.3]), atol=1e-5)
    assert_close(make(prior_scale=2.0, prior_scale_min=0.5).prior.scale, torch.full((3,), 2.0), atol=1e-5)
    # the posterior mean path: the layer records every step's posterior
    posts = net.posteriors(*batch())
    assert list(posts) == [f"rnn.z.{t}" for t in range(5)]
    assert all(loc.shape == scale.shape == (4, 3, 1) for loc, scale in posts.values())


def test_phi_stays_inside_unit_interval():
    net = make()
    with torch.no_grad():
        net.prior.raw_phi.copy_(torch.tensor([[-50.0], [0.3], [50.0]]))  # (H, 1): an ARPrior's
    phi = net.prior.phi
    assert bool((phi.abs() < 1).all()) and phi[0] < -0.999 and phi[2] > 0.999
    assert bool(torch.isfinite(net.prior.half_life).all())
    no_ar = make(ar=False)
    assert_close(no_ar.prior.phi, torch.zeros(3, 1))
    assert "z.prior.raw_phi" not in dict(no_ar.named_parameters())


def test_generate_returns_strings_from_vocabulary():
    net = make()
    names = net.generate(20, max_len=6, temperature=0.8)
    assert len(names) == 20 and all(isinstance(n, str) for n in names)
    assert all(set(n) <= set(VOCAB.chars) and len(n) <= 6 for n in names)
    ids = net.sample_ids(50, max_len=6)
    assert ids.shape == (50, 6) and int(ids.min()) >= PAD and int(ids.max()) < VOCAB.size
    for row in ids.tolist():  # after the end boundary only padding
        if 0 in row:
            assert all(i == PAD for i in row[row.index(0) + 1 :])
    with pytest.raises(ValueError, match="vocabulary"):
        RecurrentVDN(VOCAB.size, **SMALL).generate(2)
    with pytest.raises(ValueError, match="temperature"):
        net.generate(2, temperature=0.0)


def test_model_samples_next_tokens_without_y():
    net = make()
    x, y = batch()
    out = net.model(x)
    assert out.shape == (4, 5) and torch.equal(out == PAD, y[:, :5] == PAD)
    with pytest.raises(ValueError, match="reads the targets"):
        net.guide(x)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda x, y: (x.float(), y), TypeError, "integer token ids"),
        (lambda x, y: (x, y[:, :-1]), ValueError, "Expected y of shape"),
        (lambda x, y: (x, torch.where(y == PAD, 1, y)), ValueError, "same positions"),
        (lambda x, y: (x.clamp_max(9) + 9 * (x == 1), y), ValueError, r"ids in \[0, 6\)"),
        (lambda x, y: (x[:, [0, 2, 1, 3, 4]], y[:, [0, 2, 1, 3, 4]]), ValueError, "right-padding"),
        (lambda x, y: (x[:, 2:], y[:, 2:]), ValueError, "all padding"),
    ],
    ids=["float", "shape", "pad-mismatch", "range", "gap", "empty-row"],
)
def test_check_inputs(change, error, match):
    net = make()
    x, y = change(*batch())
    with pytest.raises(error, match=match):
        net.model(x, y)


def test_deterministic_loss_equals_exact_nll():
    net = make(deterministic=True)
    x, y = batch()
    loss = LocalELBO().loss(net.model, net.guide, x, y)
    ev = evaluate_sequences(net, x, y)
    assert ev.num_chars == 14
    assert_close(loss / 14, ev.nll, rtol=1e-5)
    assert ev.nll_bound == ev.nll and ev.replaced == {}


def test_elbo_agrees_with_evaluation_bound():
    pyro.set_rng_seed(1)
    net = make()
    x, y = batch()
    elbo = LocalELBO(num_particles=400, vectorize_particles=True)
    loss = elbo.loss(net.model, net.guide, x, y)
    ev = evaluate_sequences(net, x, y, num_samples=400, replace_samples=4)
    assert_close(loss / ev.num_chars, ev.nll_bound, rtol=0.01)
    # importance sampling tightens the bound; every replacement is a valid log loss
    assert ev.nll < ev.nll_bound
    assert set(ev.replaced) == {"prior", "posterior_mean", "zeros", "prior_mean"}
    assert ev.unit_kl.shape == (3,) and ev.unit_kl_time.shape == (x.shape[1], 3)
    assert_close(ev.unit_kl.sum(), ev.kl, rtol=1e-5)
    assert ev.time_counts.tolist()[:5] == [4, 4, 3, 2, 1]
    assert ev.bits(math.log(2)) == pytest.approx(1.0)


def test_tiny_overfit_reduces_loss():
    net = make(hidden=16, units=4)
    x, y = batch()
    before = evaluate_sequences(net, x, y, num_samples=16)
    result = fit(net, x, y, steps=150, batch_size=4, lr=0.03, seed=0, progress=False)
    after = evaluate_sequences(net, x, y, num_samples=16)
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    assert after.nll_bound < 0.5 * before.nll_bound
    assert after.nll < 0.5 * before.nll


# ------------------------------------------------------------------ path posterior
PATH = dict(posterior="path", posterior_context=5)


def test_default_posterior_is_the_step_posterior():
    from vdn_pyro.guides import RecurrentPathPosterior, RecurrentPosterior

    net = make()
    assert net.config.posterior == "step" and type(net.posterior) is RecurrentPosterior
    path = make(**PATH)
    assert isinstance(path.posterior, RecurrentPathPosterior) and path.posterior.context_dim == 5
    assert path.posterior.residual and not make(**PATH, residual_posterior=False).posterior.residual


@pytest.mark.parametrize("residual", [True, False])
def test_path_trace_sites_shapes_and_mask(residual):
    net = make(**PATH, residual_posterior=residual)
    x, y = batch(max_len=7)  # lengths 4, 2, 5, 3 (boundary included); 2 all-padding columns
    guide_trace = poutine.trace(net.guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(net.model, trace=guide_trace)).get_trace(x, y)
    assert latent_sites(guide_trace) == latent_sites(model_trace) == [f"rnn.z.{t}" for t in range(5)]
    mask = y != PAD
    for t in range(5):
        for trace in (guide_trace, model_trace):
            site = trace.nodes[f"rnn.z.{t}"]
            assert site["value"].shape == (4, 3, 1)
            assert site["fn"].batch_shape == (4, 3) and site["fn"].event_shape == (1,)
            assert site["mask"][:, 0].tolist() == mask[:, t].tolist()
        # where a row has ended the guide's step is the prior's: no KL from padding
        q, p = guide_trace.nodes[f"rnn.z.{t}"]["fn"], model_trace.nodes[f"rnn.z.{t}"]["fn"]
        ended = ~mask[:, t]
        assert_close(q.base_dist.loc[ended], p.base_dist.loc[ended])
        assert_close(q.base_dist.scale.expand(4, 3, 1)[ended], p.base_dist.scale.expand(4, 3, 1)[ended])
    assert model_trace.nodes["obs"]["fn"].event_shape == (5,)


@pytest.mark.parametrize("variant", ["path", "path-plain"])
def test_path_padding_contributes_nothing(variant):
    test_padding_contributes_nothing(variant)  # the backward context skips each row's padding


def test_path_context_reads_the_row_from_t_to_its_end():
    net = make(**PATH)
    post = net.posterior
    x, y = batch(max_len=7)
    y0, mask = y.clamp_min(0), y != PAD
    g = post.context(y0, mask)  # (B, T, C)
    assert g.shape == (4, 7, 5)
    for row, text in enumerate(TEXTS):
        _, yr = batch([text])  # (1, L), no padding
        single = post.context(yr, torch.ones_like(yr, dtype=torch.bool))[0]  # (L, C)
        assert_close(g[row, : yr.shape[1]], single, atol=1e-6, rtol=1e-6)
    # g_t changes with y_t' for t' >= t and not with y_t' for t' < t
    changed = y0.clone()
    changed[2, 2] = (changed[2, 2] + 1) % VOCAB.size  # row 2 has length 5
    g2 = post.context(changed, mask)
    assert torch.equal(g2[2, 3:5], g[2, 3:5]) and not torch.allclose(g2[2, :3], g[2, :3])
    assert torch.equal(g2[[0, 1, 3]], g[[0, 1, 3]])


@pytest.fixture
def float64():
    """Build and run in float64 (the network's zero states follow the default dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _double_net(**options):
    assert torch.get_default_dtype() == torch.float64
    return make(**PATH, **options)


def _randomise_path_heads(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    post = net.posterior
    with torch.no_grad():
        for param in (post.transition.weight, post.transition.bias, post.loc.weight, post.scale_head.weight):
            param.copy_(0.5 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def _hand_path(net, x, y, draws):
    """Run the recurrence by hand along the guide's draws {site: (B, H, 1)}: the chain's
    coefficients (a, b, s), the prior's (loc, scale), each (B, H, T), and the log-likelihood (B, T)."""
    x, y, mask = net._prepare(x, y)
    post, prior = net.posterior, net.prior
    context = post.context(y, mask)  # (B, T, C)
    state, z = net.initial_state(x.shape[0]), torch.zeros(x.shape[0], net.units, dtype=torch.float64)
    out = {k: [] for k in ("a", "b", "s", "p_loc", "p_scale", "log_lik")}
    for t in range(x.shape[1]):
        state = net.advance(state, x[:, t], z)
        h = net.readout(state)
        p_loc, p_scale = prior.step(z, h)  # (B, H)
        a, b, s = post.coefficients(h, context[:, t], prior.phi[:, 0], prior.input(h))  # (B, H)
        z = draws[f"rnn.z.{t}"].squeeze(-1)  # (B, H)
        log_lik = log_softmax(net.logits(h, z), -1).gather(-1, y[:, t, None]).squeeze(-1)  # (B,)
        for key, value in zip(out, (a, b, s, p_loc, p_scale, log_lik)):
            out[key].append(value)
    return {k: torch.stack(v, -1) for k, v in out.items()}, mask


def test_path_guide_is_the_gauss_markov_chain_of_its_coefficients(float64):
    """float64: the guide's per-step log densities along a drawn path sum to the log density of
    the GaussMarkov chain built from the same (a_t, b_t, s_t)."""
    from vdn_pyro.distributions import GaussMarkov

    net = _double_net()
    _randomise_path_heads(net)
    x, y = batch([t for t in TEXTS if len(t) == 4 or len(t) == 3][:1] * 2)  # two rows, no padding
    pyro.set_rng_seed(3)
    trace = poutine.trace(net.guide).get_trace(x, y)
    draws = {n: trace.nodes[n]["value"] for n in latent_sites(trace)}
    hand, _ = _hand_path(net, x, y, draws)
    z = torch.stack([v.squeeze(-1) for v in draws.values()], -1)  # (B, H, T)
    chain = GaussMarkov(hand["a"], hand["b"], hand["s"])  # batch (B, H), event (T,)
    guide_log_q = sum(trace.nodes[n]["fn"].log_prob(trace.nodes[n]["value"]) for n in draws)  # (B, H)
    assert z.dtype == torch.float64
    assert_close(chain.log_prob(z), guide_log_q, atol=1e-10, rtol=1e-12)
    assert float(hand["a"].detach().abs().min()) > 1e-3  # the steps are really chained


def test_path_guide_draws_have_the_chains_moments(float64):
    """With the latents kept out of the recurrence the chain's coefficients are fixed by the
    tokens: many draws of one name have the GaussMarkov chain's means, variances and lag-1
    covariances Cov(z_t, z_{t-1}) = a_t Var(z_{t-1})."""
    from vdn_pyro.distributions import GaussMarkov

    net = _double_net()
    _randomise_path_heads(net, seed=1)
    with torch.no_grad():
        net.cell.weight_ih[:, net.config.embed_dim :] = 0.0  # h_t no longer reads z_{t-1}
    num = 20000
    x, y = batch(["edcb"] * num)  # (N, 5)
    pyro.set_rng_seed(0)
    draws = net.guide(x, y)
    z = torch.stack([v.squeeze(-1) for v in draws.values()], -1).detach()  # (N, H, T)
    with torch.no_grad():
        hand, _ = _hand_path(net, x[:1], y[:1], {k: v[:1] for k, v in draws.items()})
    chain = GaussMarkov(hand["a"][0], hand["b"][0], hand["s"][0])  # batch (H,), event (T,)
    var = chain.variance.detach()  # (H, T)
    assert_close(z.mean(0), chain.mean.detach(), atol=float(5 * (var / num).sqrt().max()))
    assert_close(z.var(0), var, rtol=0.05)
    centred = z - z.mean(0)
    lag1 = (centred[..., 1:] * centred[..., :-1]).mean(0)  # (H, T - 1)
    expected = hand["a"][0, :, 1:] * var[:, :-1]  # (H, T - 1)
    assert_close(lag1, expected, atol=float(5 * (var[:, 1:] * var[:, :-1] / num).sqrt().max()))
    assert float(expected.abs().max()) > 0.1  # a correlation the test could miss


def test_path_local_elbo_equals_the_hand_per_step_kls(float64):
    """float64: given the guide's draws, LocalELBO is exactly -sum log p(y_t | .) + sum of the
    per-step Gaussian KL(q(z_t | z_{t-1}) || p(z_t | z_{t-1})) over real positions, and
    Trace_ELBO is exactly -sum log p(y) - log p(z) + log q(z)."""
    net = _double_net()
    _randomise_path_heads(net, seed=2)
    net.beta.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x, y = batch(max_len=6)  # padded rows
    pyro.set_rng_seed(5)
    guide_trace = poutine.trace(net.guide).get_trace(x, y)
    draws = {n: guide_trace.nodes[n]["value"] for n in latent_sites(guide_trace)}
    replayed = poutine.replay(net.guide, trace=guide_trace)
    local = LocalELBO().loss(net.model, replayed, x, y)
    trace_loss = pyro.infer.Trace_ELBO().loss(net.model, replayed, x, y)
    with torch.no_grad():
        hand, mask = _hand_path(net, x, y, draws)
    draws = {name: value.detach() for name, value in draws.items()}
    m = mask.to(torch.float64)  # (B, T)
    q = torch.distributions.Normal(hand["a"] * _prev(draws) + hand["b"], hand["s"])  # (B, H, T)
    p = torch.distributions.Normal(hand["p_loc"], hand["p_scale"])
    kl = torch.distributions.kl_divergence(q, p)  # (B, H, T)
    z = torch.stack([v.squeeze(-1) for v in draws.values()], -1)  # (B, H, T)
    beta = net.beta[:, None]  # (H, 1)
    nll = -(hand["log_lik"] * m).sum()
    assert_close(local, float(nll + (beta * kl * m[:, None]).sum()), atol=1e-9, rtol=1e-12)
    log_ratio = q.log_prob(z) - p.log_prob(z)  # (B, H, T)
    assert_close(trace_loss, float(nll + (beta * log_ratio * m[:, None]).sum()), atol=1e-9, rtol=1e-12)


def _prev(draws):
    """z_{t-1} along the draws (0 at t = 0), (B, H, T)."""
    z = torch.stack([v.squeeze(-1) for v in draws.values()], -1)  # (B, H, T)
    return torch.cat([torch.zeros_like(z[..., :1]), z[..., :-1]], -1)


def test_path_elbo_agrees_with_evaluation_bound():
    pyro.set_rng_seed(1)
    net = make(**PATH)
    _randomise_path_heads(net)
    x, y = batch()
    loss = LocalELBO(num_particles=400, vectorize_particles=True).loss(net.model, net.guide, x, y)
    ev = evaluate_sequences(net, x, y, num_samples=400, replace_samples=4)
    assert_close(loss / ev.num_chars, ev.nll_bound, rtol=0.01)
    assert ev.nll < ev.nll_bound
    # the posterior mean path: each step's loc is a_t times the previous loc plus b_t
    posts = net.posteriors(x, y)
    assert list(posts) == [f"rnn.z.{t}" for t in range(5)]
    assert all(loc.shape == scale.shape == (4, 3, 1) for loc, scale in posts.values())


def test_path_tiny_overfit_reduces_loss():
    net = make(**PATH, hidden=16, units=4)
    x, y = batch()
    before = evaluate_sequences(net, x, y, num_samples=16)
    result = fit(net, x, y, steps=150, batch_size=4, lr=0.03, seed=0, progress=False)
    after = evaluate_sequences(net, x, y, num_samples=16)
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    assert after.nll_bound < 0.5 * before.nll_bound


def test_path_checkpoint_round_trip(tmp_path):
    from vdn_pyro.inference.checkpoint import IncompatibleCheckpointError, load_network, save_checkpoint

    net = make(**PATH)
    _randomise_path_heads(net)
    path = save_checkpoint(tmp_path / "last.pt", {"network": net.state_dict()}, network=net)
    rebuilt = load_network(path)
    assert rebuilt.config.posterior == "path" and rebuilt.config.posterior_context == 5
    x, y = batch()
    a, b = net.score(x, y, "posterior_mean"), rebuilt.score(x, y, "posterior_mean")
    assert torch.equal(a.log_lik, b.log_lik) and torch.equal(a.kl, b.kl)
    with pytest.raises(IncompatibleCheckpointError, match="config.posterior"):
        load_network(path, make())  # a step-posterior network is not this architecture


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"posterior": "paths"}, ValueError, "posterior in"),
        ({"posterior": None}, ValueError, "posterior in"),
        ({"posterior": "path", "posterior_context": 0}, ValueError, "posterior_context >= 1"),
        ({"posterior": "path", "posterior_context": 2.5}, TypeError, "posterior_context"),
    ],
)
def test_path_bad_config_refused(options, error, match):
    with pytest.raises(error, match=match):
        make(**options)


def test_path_head_refuses_bad_arguments():
    from vdn_pyro.guides import RecurrentPathPosterior

    with pytest.raises(ValueError, match="context_dim"):
        RecurrentPathPosterior(8, 6, 3, context_dim=0)
    head = RecurrentPathPosterior(8, 6, 3, context_dim=4)
    with pytest.raises(ValueError, match="phi and drive"):
        head.coefficients(torch.zeros(2, 8), torch.zeros(2, 4))
    a, b, s = RecurrentPathPosterior(8, 6, 3, context_dim=4, residual=False).coefficients(
        torch.zeros(2, 8), torch.zeros(2, 4)
    )
    assert a.shape == b.shape == s.shape == (2, 3) and torch.equal(a, torch.zeros(2, 3))  # starts at 0


def test_recurrent_ar_benchmark_quick(tmp_path):
    """``benchmarks/recurrent_ar.py --quick`` runs every variant and writes its tables."""
    from tests.common import ROOT, load_script

    bench = load_script(ROOT / "benchmarks" / "recurrent_ar.py", "bench_recurrent_ar")
    argv = ["--quick", "--seeds", "0", "1", "--out-dir", str(tmp_path)]
    runs, out = bench.main(argv)
    assert out == tmp_path
    assert sorted(runs["variant"]) == sorted(list(bench.VARIANTS) * 2)
    assert runs["test_bound_bits"].notna().all() and (runs["test_is_bits"] > 0).all()
    gru = runs[runs["kind"] == "gru"]
    assert (gru["test_is_bits"] == gru["test_bound_bits"]).all()  # the GRU's NLL is exact
    assert (runs.loc[runs["kind"] == "vdn-no-ar", "phi_max"] == 0).all()
    text = (tmp_path / "recurrent_ar.md").read_text()
    assert "AR - no-AR, step posterior" in text and "AR - no-AR, path posterior" in text
    assert (tmp_path / "recurrent_ar.csv").exists()
