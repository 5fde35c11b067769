"""SPEC 2.3: PCA + full-covariance Gaussian mixture, fitted with scikit-learn, exported as a pure torch module.

The module holds the fitted parameters (Cholesky factors of the precisions, as scikit-learn keeps them) as
float32 buffers, derived in float64 first, so scoring needs only torch and matches scikit-learn's likelihood
to float32 precision (half the time of float64 on a CPU).

Beyond SPEC 2.3's M (which only sees the Nh kept dimensions), `m_full` also scores the part of the patch PCA
dropped, as probabilistic PCA does (Tipping & Bishop 1999): the discarded directions share one variance, the
mean of PCA's discarded eigenvalues (+ reg_covar). A fine scratch or a 1-px fibre lives mostly in those
low-variance directions, so M alone misses it when Nh is small; with Nh = every pixel the two are equal.
The pixel map is the per-pixel share of m_full (it sums to m_full over the patch): the ZCA-whitened residual
(x - mean) projected to the kept directions, whitened by the MAP component's symmetric precision square root
and mapped back to pixels, plus the dropped part's residual over its variance.
"""

import math
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn


class PCAGMM(nn.Module):
    """Patches (N,C,P,P) -> PCA features f (N, Nh) -> GMM terms for the MAP component k = argmax p(k|f).

    Scores: m = 1/2 (f - mu_k)^T Sigma_k^-1 (f - mu_k) ("unregularized"), d = -log w_k,
    a = 1/2 log((2 pi)^Nh |Sigma_k|), nll = -log sum_k w_k N(f; mu_k, Sigma_k) (the classic score),
    m_full = m + 1/2 |x - x_pca|^2 / residual_var (default: M over the whole patch, see the module doc).
    """

    score_names: List[str]
    default_score: str

    def __init__(self, pca_mean: np.ndarray, pca_components: np.ndarray, weights: np.ndarray, means: np.ndarray,
                 precisions_cholesky: np.ndarray, channels: int, patch_size: int, residual_var: float = 0.0):
        super().__init__()
        self.channels = channels
        self.patch_size = patch_size
        self.nh = int(pca_components.shape[0])
        f32 = torch.float32
        self.register_buffer("pca_mean", torch.as_tensor(pca_mean, dtype=f32))  # (D,)
        self.register_buffer("pca_components", torch.as_tensor(pca_components, dtype=f32))  # (Nh, D)
        self.register_buffer("log_weights", torch.log(torch.as_tensor(weights, dtype=torch.float64)).float())  # (K,)
        self.register_buffer("means", torch.as_tensor(means, dtype=f32))  # (K, Nh)
        prec_chol = torch.as_tensor(precisions_cholesky, dtype=torch.float64)  # (K, Nh, Nh), precision = L L^T
        self.register_buffer("precisions_cholesky", prec_chol.float())
        # 1/2 log((2 pi)^Nh |Sigma_k|) = Nh/2 log(2 pi) - sum log diag(L_k), since |Sigma_k| = 1 / |L_k|^2.
        log_det_l = torch.log(torch.diagonal(prec_chol, dim1=1, dim2=2)).sum(1)
        self.register_buffer("log_normalizer", (0.5 * self.nh * math.log(2.0 * math.pi) - log_det_l).float())  # (K,)
        # Symmetric square roots S_k of the precisions (S_k S_k = Sigma_k^-1): y = S_k (f - mu_k) has |y|^2 = 2 m
        # and, mapped back by the orthonormal PCA rows, stays local in the patch (ZCA whitening).
        roots = []
        for chol in precisions_cholesky:
            vals, vecs = np.linalg.eigh(chol @ chol.T)
            roots.append((vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T)
        self.register_buffer("precision_sqrt", torch.as_tensor(np.stack(roots), dtype=f32))  # (K, Nh, Nh)
        # 0 when PCA keeps every dimension: the residual is then zero and not scored.
        self.register_buffer("inv_residual_var", torch.tensor(1.0 / residual_var if residual_var > 0 else 0.0,
                                                              dtype=f32))
        self.score_names = ["m_full", "m", "nll", "d", "a"]
        self.default_score = "m_full"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N,C,P,P) -> PCA features (N, Nh) float32."""
        return (x.flatten(1).float() - self.pca_mean) @ self.pca_components.t()

    def mahalanobis_half(self, f: torch.Tensor) -> torch.Tensor:
        """(N, Nh) -> (N, K): 1/2 (f - mu_k)^T Sigma_k^-1 (f - mu_k) = 1/2 |L_k^T (f - mu_k)|^2."""
        # y[n, k, :] = (f_n - mu_k) @ L_k; the difference first, so float32 does not cancel two large products
        y = torch.einsum("nkd,kde->nke", f.unsqueeze(1) - self.means, self.precisions_cholesky)
        return 0.5 * y.pow(2).sum(2)

    def component_terms(self, f: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, Nh) features -> (N, K) half Mahalanobis distances, (N, K) log w_k p(f|k), (N, 1) MAP components."""
        m_all = self.mahalanobis_half(f)
        log_joint = self.log_weights - self.log_normalizer - m_all
        return m_all, log_joint, torch.argmax(log_joint, dim=1, keepdim=True)

    def residual(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """(N, D) what PCA's Nh directions do not explain: x - (mean + f V)."""
        return x.flatten(1).float() - (f @ self.pca_components + self.pca_mean)

    @torch.jit.export
    def scores(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        f = self.features(x)
        m_all, log_joint, k = self.component_terms(f)
        m = m_all.gather(1, k).squeeze(1)
        residual_m = 0.5 * self.residual(x, f).pow(2).sum(1) * self.inv_residual_var
        return {
            "m_full": (m + residual_m).float(),
            "m": m.float(),
            "nll": (-torch.logsumexp(log_joint, dim=1)).float(),
            "d": (-self.log_weights[k.squeeze(1)]).float(),
            "a": self.log_normalizer[k.squeeze(1)].float(),
        }

    @torch.jit.export
    def score(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if name not in self.score_names:
            raise ValueError("unknown score name")
        return self.scores(x)[name]

    @torch.jit.export
    def pixel_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, P): each pixel's share of m_full, summed over channels (the map sums to m_full)."""
        f = self.features(x)
        _, _, k = self.component_terms(f)
        k = k.squeeze(1)
        y = torch.zeros_like(f)
        for c in range(self.precision_sqrt.shape[0]):  # per component: N x Nh^2 in all, not N x K x Nh^2
            rows = (k == c).nonzero().squeeze(1)
            if rows.numel() > 0:
                y[rows] = (f[rows] - self.means[c]) @ self.precision_sqrt[c]
        share = 0.5 * (y @ self.pca_components).pow(2) + 0.5 * self.residual(x, f).pow(2) * self.inv_residual_var
        return share.view(x.shape[0], self.channels, self.patch_size, self.patch_size).sum(1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x, self.default_score)


def fit_pca_gmm(crops: torch.Tensor, nh: int, components: int, reg_covar: float, seed: int,
                max_iter: int = 200) -> tuple:
    """Fit PCA (Nh dims) and a full-covariance GMM (EM) on crops (N,C,P,P); returns (module, pca, gmm, info)."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    n, c, p, _ = crops.shape
    x = crops.reshape(n, -1).double().numpy()
    pca = PCA(n_components=nh, random_state=seed).fit(x)
    f = pca.transform(x)
    gmm = GaussianMixture(n_components=components, covariance_type="full", reg_covar=reg_covar,
                          max_iter=max_iter, random_state=seed).fit(f)
    # PCA's noise_variance_ is the mean discarded eigenvalue (0 when Nh = D); reg_covar keeps it off zero.
    residual_var = float(pca.noise_variance_) + reg_covar if nh < x.shape[1] else 0.0
    module = PCAGMM(pca.mean_, pca.components_, gmm.weights_, gmm.means_, gmm.precisions_cholesky_, c, p,
                    residual_var)
    info: Dict[str, Any] = {
        "em_iterations": int(gmm.n_iter_), "converged": bool(gmm.converged_),
        "mean_nll": float(-gmm.score(f)), "explained_variance": float(pca.explained_variance_ratio_.sum()),
        "residual_variance": residual_var,
    }
    return module, pca, gmm, info
