"""The strategies' scores and KCFU's losses in multi-label form: pure
TensorFlow functions of logits, run inside the clients' TFF computation
(`active.client_work`) and checked against NumPy (tests/active).

FLAIR's model gives one logit per label, `z_y(x)`, and label `y` is an
independent Bernoulli with `sigma(z_y)`; KAFAL (Cao et al., ICCV 2023,
arXiv 2211.13579) is written for one softmax over classes.
docs/active_learning.md derives each form below from the paper's
equation; in short, with a client's labelled set of `N` images of which
`n_y` carry label `y`:

* the client's label prior, Laplace-smoothed, `pi_y = (n_y + 1) / (N + 2)`,
  and its log-odds `b_y = log(pi_y / (1 - pi_y))` (`label_log_odds`): the
  multi-label counterpart of KAFAL's `log n_y` logit offset;
* KSAS (Eqs. (1)-(3)): `P_y = sigma(z^local_y + b_y)`,
  `Q_y = sigma(z^global_y + b_y)` and the symmetric Bernoulli KL
  `D(x) = 1/2 sum_y [KL(P_y||Q_y) + KL(Q_y||P_y)]
        = 1/2 sum_y (P_y - Q_y)(z^local_y - z^global_y)` (`ksas_scores`);
* entropy: `sum_y H(sigma(z^global_y))` (`entropy_scores`);
* KCFU's balanced classifier: binary cross-entropy of `z_y + b_y`
  (`balanced_loss`);
* KCFU's compensatory term on mixed unlabelled images:
  `sum_y Gamma_y KL(sigma(z^global_y) || sigma(z^local_y))`, averaged over
  the images, with `Gamma_y` proportional to `1 / pi_y` and summing to 1
  (`compensation_weights`, `compensation_loss`).
"""

import tensorflow as tf

# Beta(2, 2): the mixing coefficient of KCFU's mixed unlabelled images
# (KAFAL's code, config.BETA).
MIXUP_CONCENTRATION = 2.0


def label_log_odds(counts: tf.Tensor, num_labelled: tf.Tensor) -> tf.Tensor:
  """`b_y = log((n_y + 1) / (N - n_y + 1))`, the log-odds of the
  Laplace-smoothed prior `(n_y + 1) / (N + 2)`.

  Args:
    counts: float32 `[L]`, labelled images carrying each label.
    num_labelled: float32 scalar, the labelled images `N`.

  Returns:
    float32 `[L]`.
  """
  counts = tf.cast(counts, tf.float32)
  num_labelled = tf.cast(num_labelled, tf.float32)
  return tf.math.log(counts + 1.0) - tf.math.log(num_labelled - counts + 1.0)


def ksas_scores(local_logits: tf.Tensor, global_logits: tf.Tensor,
                log_odds: tf.Tensor) -> tf.Tensor:
  """KSAS's discrepancy `D(x)` per image (module docstring).

  Args:
    local_logits: float `[B, L]`, the client's local model.
    global_logits: float `[B, L]`, the global model.
    log_odds: float32 `[L]`, `label_log_odds` of the client.

  Returns:
    float32 `[B]`, >= 0.
  """
  local_logits = tf.cast(local_logits, tf.float32)
  global_logits = tf.cast(global_logits, tf.float32)
  p = tf.sigmoid(local_logits + log_odds)
  q = tf.sigmoid(global_logits + log_odds)
  return 0.5 * tf.reduce_sum((p - q) * (local_logits - global_logits),
                             axis=-1)


def entropy_scores(global_logits: tf.Tensor) -> tf.Tensor:
  """`sum_y H(sigma(z_y))` per image, in nats: the entropy of the global
  model's joint label distribution (labels independent given the image).

  Args:
    global_logits: float `[B, L]`.

  Returns:
    float32 `[B]`, in `[0, L log 2]`.
  """
  z = tf.cast(global_logits, tf.float32)
  q = tf.sigmoid(z)
  return -tf.reduce_sum(q * tf.math.log_sigmoid(z)
                        + (1.0 - q) * tf.math.log_sigmoid(-z), axis=-1)


def balanced_loss(logits: tf.Tensor, labels: tf.Tensor,
                  log_odds: tf.Tensor) -> tf.Tensor:
  """KCFU's balanced classifier: the mean over images and labels of the
  binary cross-entropy of `sigma(z_y + b_y)` against the labels.

  Args:
    logits: float `[B, L]`.
    labels: int or float `[B, L]`, 0/1.
    log_odds: float32 `[L]`.

  Returns:
    float32 scalar.
  """
  adjusted = tf.cast(logits, tf.float32) + log_odds
  return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
      labels=tf.cast(labels, tf.float32), logits=adjusted))


def compensation_weights(counts: tf.Tensor,
                         num_labelled: tf.Tensor) -> tf.Tensor:
  """`Gamma_y = (1 / pi_y) / sum_c (1 / pi_c)`, the weak labels' weights
  (`pi` the Laplace-smoothed prior of `label_log_odds`).

  Returns:
    float32 `[L]`, positive, summing to 1.
  """
  counts = tf.cast(counts, tf.float32)
  inverse = (tf.cast(num_labelled, tf.float32) + 2.0) / (counts + 1.0)
  return inverse / tf.reduce_sum(inverse)


def bernoulli_kl(target_logits: tf.Tensor,
                 logits: tf.Tensor) -> tf.Tensor:
  """`KL(Ber(sigma(t)) || Ber(sigma(z)))` elementwise, from logits."""
  t = tf.cast(target_logits, tf.float32)
  z = tf.cast(logits, tf.float32)
  q = tf.sigmoid(t)
  return (q * (tf.math.log_sigmoid(t) - tf.math.log_sigmoid(z))
          + (1.0 - q) * (tf.math.log_sigmoid(-t) - tf.math.log_sigmoid(-z)))


def compensation_loss(local_logits: tf.Tensor, global_logits: tf.Tensor,
                      weights: tf.Tensor) -> tf.Tensor:
  """KCFU's compensatory term: the mean over images of
  `sum_y Gamma_y KL(sigma(z^global_y) || sigma(z^local_y))`; 0 for no
  image.

  Args:
    local_logits: float `[B, L]`, the model being trained.
    global_logits: float `[B, L]`, the global model (a constant).
    weights: float32 `[L]`, `compensation_weights`.

  Returns:
    float32 scalar.
  """
  per_image = tf.reduce_sum(
      weights * bernoulli_kl(tf.stop_gradient(global_logits), local_logits),
      axis=-1)
  count = tf.maximum(tf.cast(tf.size(per_image), tf.float32), 1.0)
  return tf.reduce_sum(per_image) / count


def mixup(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mixed images for KCFU's compensatory term: image `i` of the batch
  with image `B - 1 - i`, `lam * x_i + (1 - lam) * x_{B-1-i}`, one
  `lam ~ Beta(2, 2)` per image drawn from the stateless `seed`.

  Args:
    images: `[B, H, W, C]` (any real or integer dtype).
    seed: int64 `[2]`.

  Returns:
    float32 `[B, H, W, C]`.
  """
  images = tf.cast(images, tf.float32)
  size = tf.shape(images)[:1]
  gammas = tf.random.stateless_gamma(
      tf.concat([[2], size], 0), seed=tf.cast(seed, tf.int64),
      alpha=MIXUP_CONCENTRATION)
  lam = gammas[0] / (gammas[0] + gammas[1])
  lam = tf.reshape(lam, [-1, 1, 1, 1])
  return lam * images + (1.0 - lam) * tf.reverse(images, axis=[0])
