"""The strategies' scores and KCFU's losses (`benchmark.active.scores`)
equal direct NumPy computations of the formulas in docs/active_learning.md
on fixed logits and a fixed batch, and KCFU's training loss in the clients'
work (`client_work._train_step`) is the documented combination."""

import numpy as np
import pytest
import tensorflow as tf

from benchmark.active import scores

L = 5
RNG = np.random.default_rng(7)
LOCAL = RNG.normal(0, 2, [6, L]).astype(np.float32)
GLOBAL = RNG.normal(0, 2, [6, L]).astype(np.float32)
LABELS = (RNG.random([6, L]) < 0.3).astype(np.int32)
COUNTS = np.array([0, 3, 10, 1, 7], np.float32)
N = 10.0


def _sigmoid(z):
  return 1 / (1 + np.exp(-z.astype(np.float64)))


def _log_odds():
  prior = (COUNTS + 1) / (N + 2)
  return np.log(prior / (1 - prior))


def _kl(p, q):
  """Bernoulli KL(p || q), elementwise."""
  return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def test_label_log_odds_is_the_log_odds_of_the_smoothed_prior():
  np.testing.assert_allclose(scores.label_log_odds(COUNTS, N).numpy(),
                             _log_odds(), rtol=1e-5)


def test_ksas_is_the_symmetric_bernoulli_kl_of_the_prior_adjusted_models():
  b = _log_odds()
  p, q = _sigmoid(LOCAL + b), _sigmoid(GLOBAL + b)
  expected = 0.5 * (_kl(p, q) + _kl(q, p)).sum(axis=1)
  got = scores.ksas_scores(LOCAL, GLOBAL, _log_odds().astype(np.float32))
  np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6)
  assert (got.numpy() >= 0).all()


def test_ksas_is_zero_when_the_local_model_is_the_global_one():
  got = scores.ksas_scores(GLOBAL, GLOBAL, _log_odds().astype(np.float32))
  np.testing.assert_allclose(got.numpy(), 0.0, atol=1e-7)


def test_ksas_amplifies_the_clients_frequent_labels():
  """One label's logits differ by the same amount: KSAS is larger when the
  client's prior makes that label likely (the paper's amplification)."""
  local = np.zeros([1, 2], np.float32)
  glob = np.array([[1.0, 0.0]], np.float32)
  frequent = scores.ksas_scores(local, glob, np.array([2.0, 0.0], np.float32))
  rare = scores.ksas_scores(local, glob, np.array([-4.0, 0.0], np.float32))
  assert frequent.numpy()[0] > rare.numpy()[0]


def test_entropy_is_the_sum_of_the_labels_bernoulli_entropies():
  q = _sigmoid(GLOBAL)
  expected = -(q * np.log(q) + (1 - q) * np.log(1 - q)).sum(axis=1)
  np.testing.assert_allclose(scores.entropy_scores(GLOBAL).numpy(), expected,
                             rtol=1e-4)


def test_balanced_loss_is_the_mean_bce_of_the_prior_adjusted_logits():
  q = _sigmoid(LOCAL + _log_odds())
  expected = -(LABELS * np.log(q) + (1 - LABELS) * np.log(1 - q)).mean()
  got = scores.balanced_loss(LOCAL, LABELS, _log_odds().astype(np.float32))
  np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_compensation_weights_are_inverse_priors_summing_to_one():
  gamma = scores.compensation_weights(COUNTS, N).numpy()
  inverse = (N + 2) / (COUNTS + 1)
  np.testing.assert_allclose(gamma, inverse / inverse.sum(), rtol=1e-5)
  assert gamma.argmax() == 0 and gamma.argmin() == 2  # Weakest, strongest.


def test_compensation_loss_is_the_weighted_kl_from_the_global_model():
  gamma = scores.compensation_weights(COUNTS, N).numpy()
  expected = (gamma * _kl(_sigmoid(GLOBAL), _sigmoid(LOCAL))).sum(1).mean()
  got = scores.compensation_loss(LOCAL, GLOBAL, gamma)
  np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_compensation_loss_trains_the_local_model_only():
  local = tf.Variable(LOCAL)
  glob = tf.Variable(GLOBAL)
  with tf.GradientTape() as tape:
    loss = scores.compensation_loss(local, glob, tf.ones([L]) / L)
  grad_local, grad_global = tape.gradient(loss, [local, glob])
  assert grad_global is None
  assert np.abs(grad_local.numpy()).sum() > 0


def test_mixup_mixes_each_image_with_its_mirror_in_the_batch():
  images = np.stack([np.full([2, 2, 3], v, np.uint8) for v in (0, 100, 200)])
  mixed = scores.mixup(images, tf.constant([1, 2], tf.int64)).numpy()
  lam = 1 - mixed[0, 0, 0, 0] / 200.0  # Image 0 mixed with image 2.
  assert 0 < lam < 1
  np.testing.assert_allclose(mixed[0], lam * 0 + (1 - lam) * 200, rtol=1e-5)
  np.testing.assert_allclose(mixed[1], 100, rtol=1e-5)  # Its own mirror.
  again = scores.mixup(images, tf.constant([1, 2], tf.int64)).numpy()
  np.testing.assert_array_equal(mixed, again)


class _Model:
  """A linear model on flattened images, shaped like TFF's VariableModel
  where `_train_step` touches it."""

  def __init__(self, kernel):
    self.kernel = tf.Variable(kernel)

  def predict_on_batch(self, x, training=True):
    del training
    return tf.reshape(tf.cast(x, tf.float32), [tf.shape(x)[0], -1]) @ (
        self.kernel)


@pytest.mark.parametrize("compensate", [0.0, 1.0])
def test_kcfu_training_loss_is_balanced_plus_weighted_compensation(compensate):
  """The loss the clients' work differentiates with KCFU (the formula of
  client_work's docstring) on a fixed batch."""
  from benchmark.active import client_work  # pylint: disable=g-import-not-at-top
  x = RNG.normal(size=[4, 3]).astype(np.float32)
  u = RNG.normal(size=[4, 3]).astype(np.float32)
  y = (RNG.random([4, 2]) < 0.5).astype(np.int32)
  kernel = RNG.normal(size=[3, 2]).astype(np.float32)
  teacher_kernel = RNG.normal(size=[3, 2]).astype(np.float32)
  counts = np.array([1.0, 3.0], np.float32)
  log_odds = scores.label_log_odds(counts, 4.0)
  gamma = scores.compensation_weights(counts, 4.0)
  weight = 0.5
  got = client_work.kcfu_loss(_Model(kernel), _Model(teacher_kernel),
                              x @ kernel, y, u,
                              (log_odds, gamma, tf.constant(compensate)),
                              weight)[0]
  b = log_odds.numpy()
  q = _sigmoid(x @ kernel + b)
  balanced = -(y * np.log(q) + (1 - y) * np.log(1 - q)).mean()
  g = gamma.numpy()
  comp = (g * _kl(_sigmoid(u @ teacher_kernel), _sigmoid(u @ kernel))).sum(
      1).mean()
  np.testing.assert_allclose(got.numpy(), balanced + weight * compensate * comp,
                             rtol=1e-4)
