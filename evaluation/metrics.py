"""Sample-based measures: Frechet distance, classifier score, class coverage, Parzen windows,
precision and recall, and the nearest-neighbour distances of the memorisation check.

All take plain tensors, so they are tested on synthetic data with known answers.
"""

import math

import numpy as np
import torch

# The Parzen bandwidths tried on the validation images (Goodfellow et al., 2014, choose sigma there too).
DEFAULT_SIGMAS = tuple(np.logspace(math.log10(0.05), math.log10(0.5), 21).tolist())


# ---------------------------------------------------------------- Frechet distance (FID)

def feature_statistics(features):
    """Mean and covariance (float64 numpy) of features [N, D]."""
    features = torch.as_tensor(features).double().cpu().numpy()
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mean1, cov1, mean2, cov2):
    """||m1 - m2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), the Frechet distance between two Gaussians.

    tr((C1 C2)^(1/2)) is the sum of the square roots of the eigenvalues of C1^(1/2) C2 C1^(1/2):
    that matrix is symmetric positive semi-definite, so eigh gives real eigenvalues and no
    imaginary parts to discard (scipy's sqrtm of the non-symmetric C1 C2 does). Rounding can still
    make eigenvalues of singular covariances (dead ReLU features) slightly negative: they are zero.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(cov1)
    sqrt_cov1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    product_eigenvalues = np.linalg.eigvalsh(sqrt_cov1 @ cov2 @ sqrt_cov1)
    trace_sqrt = np.sqrt(np.clip(product_eigenvalues, 0, None)).sum()
    return float(np.sum((mean1 - mean2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


def fid(features1, features2):
    """Frechet distance between Gaussians fitted to two sets of features [N, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# ---------------------------------------------------------------- classifier score and coverage

def classifier_score(logits):
    """exp(E_x KL(p(y|x) || p(y))), the Inception score with our digit classifier: 1 for samples
    that all look alike (or that the classifier cannot tell apart), up to 10 for confident and
    evenly spread ones. p(y) is the mean of p(y|x) over the samples, kept in log space."""
    log_p = torch.log_softmax(torch.as_tensor(logits).double(), dim=1)
    log_marginal = torch.logsumexp(log_p, dim=0) - math.log(len(log_p))
    kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1)
    return math.exp(kl.mean().item())


def class_fractions(logits, n_classes=10):
    """Fraction of samples the classifier assigns to each class."""
    predictions = torch.as_tensor(logits).argmax(dim=1).cpu()
    return torch.bincount(predictions, minlength=n_classes).double() / len(predictions)


def kl_to_uniform(fractions):
    """KL(fractions || uniform) in nats: 0 when every class is equally common, log K for one class."""
    fractions = torch.as_tensor(fractions).double()
    present = fractions[fractions > 0]  # 0 log 0 = 0
    return (present * torch.log(present * len(fractions))).sum().item()


# ---------------------------------------------------------------- Parzen windows (Goodfellow et al., 2014)

def squared_distances(x, centres):
    """||x_i - c_j||^2 for x [B, D] and centres [M, D], through one matmul."""
    distances = (x * x).sum(1, keepdim=True) + (centres * centres).sum(1) - 2 * x @ centres.T
    return distances.clamp_min_(0)  # rounding can make the distance of near-identical points negative


def parzen_log_likelihood(x, centres, sigmas, batch_size=1000):
    """log p(x) under isotropic Gaussian kernels of each width in ``sigmas`` centred on ``centres``.

    log p(x) = logsumexp_i(-||x - c_i||^2 / (2 sigma^2)) - log M - D/2 log(2 pi sigma^2).
    Returns [len(sigmas), N]; the distances of each batch are computed once for all widths.
    Works in the dtype and on the device of ``centres``.
    """
    n_centres, dim = centres.shape
    sigmas = torch.as_tensor(sigmas, dtype=centres.dtype, device=centres.device)
    normaliser = math.log(n_centres) + dim / 2 * torch.log(2 * math.pi * sigmas ** 2)
    batches = []
    for start in range(0, len(x), batch_size):
        distances = squared_distances(x[start:start + batch_size].to(centres), centres)
        nearest = distances.min(dim=1).values
        excess = distances - nearest[:, None]
        log_kernel_sums = []
        for sigma in sigmas:
            scale = -0.5 / sigma ** 2
            # logsumexp taken relative to the nearest centre, whose term is exp(0) = 1. Exponents
            # below -80 are clamped: those terms add under 1e-30 to a sum of at least 1, and letting
            # them underflow into subnormal numbers makes exp about eight times slower.
            terms = (excess * scale).clamp_min_(-80.0).exp_()
            log_kernel_sums.append(terms.sum(dim=1).log_() + nearest * scale)
        batches.append(torch.stack(log_kernel_sums))
    return torch.cat(batches, dim=1) - normaliser[:, None]


def select_sigma(validation, centres, sigmas=DEFAULT_SIGMAS):
    """The kernel width in ``sigmas`` with the highest mean validation log-likelihood, and that
    mean for every width (to check the best one is not at the edge of the grid)."""
    mean_ll = parzen_log_likelihood(validation, centres, sigmas).mean(dim=1)
    return float(sigmas[mean_ll.argmax().item()]), mean_ll.tolist()


# ---------------------------------------------------------------- precision and recall

def knn_radii(points, k=3, chunk=1000):
    """The distance of each of ``points`` [N, D] to its k-th nearest neighbour among the others: the
    radius of its ball in the k-NN estimate of the set's manifold."""
    points = torch.as_tensor(points).double()
    # The smallest distance in each row is the point's 0 to itself, so the k-th neighbour is the
    # (k + 1)-th smallest.
    return torch.cat([torch.cdist(block, points).kthvalue(k + 1, dim=1).values
                      for block in points.split(chunk)])


def manifold_share(queries, points, radii, chunk=1000):
    """The share of ``queries`` inside the union of the balls around ``points`` with ``radii``."""
    queries, points = torch.as_tensor(queries).double(), torch.as_tensor(points).double()
    inside = [(torch.cdist(block, points) <= radii).any(dim=1) for block in queries.split(chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkäänniemi et al., 2019): precision, the share of ``fake``
    inside the k-NN manifold of ``real`` (fidelity); recall, the share of ``real`` inside that of
    ``fake`` (diversity). Both [N, D] features; computed in chunks of pairwise distances."""
    precision = manifold_share(fake, real, knn_radii(real, k))
    recall = manifold_share(real, fake, knn_radii(fake, k))
    return precision, recall


# ---------------------------------------------------------------- memorisation

def nearest_neighbours(queries, points, chunk=500):
    """(distance, index) of the nearest of ``points`` [M, D] to each of ``queries`` [N, D], in the
    Euclidean metric, through squared_distances in chunks of queries."""
    distances, indices = [], []
    for block in torch.as_tensor(queries).split(chunk):
        nearest = squared_distances(block.to(points), points).min(dim=1)
        distances.append(nearest.values.sqrt())
        indices.append(nearest.indices)
    return torch.cat(distances), torch.cat(indices)


def memorised_share(sample_distances, test_distances, quantile=0.01):
    """The share of samples nearer to their nearest training image than ``quantile`` of held-out
    test images are to theirs, and that threshold. Fresh draws from the data distribution score
    about ``quantile``; copies of training images score 1."""
    threshold = torch.quantile(torch.as_tensor(test_distances).double(), quantile).item()
    return (torch.as_tensor(sample_distances).double() < threshold).double().mean().item(), threshold
