"""SPEC 2.3: PCA + full-covariance Gaussian mixture, fitted with scikit-learn, exported as a pure torch module.

The module holds the fitted parameters as float64 buffers (Cholesky factors of the precisions, as
scikit-learn keeps them), so scoring needs only torch and matches scikit-learn's likelihood.
"""

import math
from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn


class PCAGMM(nn.Module):
    """Patches (N,C,P,P) -> PCA features f (N, Nh) -> GMM terms for the MAP component k = argmax p(k|f).

    Scores: m = 1/2 (f - mu_k)^T Sigma_k^-1 (f - mu_k) (default, "unregularized"), d = -log w_k,
    a = 1/2 log((2 pi)^Nh |Sigma_k|), nll = -log sum_k w_k N(f; mu_k, Sigma_k) (the classic score).
    """

    score_names: List[str]
    default_score: str

    def __init__(self, pca_mean: np.ndarray, pca_components: np.ndarray, weights: np.ndarray, means: np.ndarray,
                 precisions_cholesky: np.ndarray, channels: int, patch_size: int):
        super().__init__()
        self.channels = channels
        self.patch_size = patch_size
        self.nh = int(pca_components.shape[0])
        f64 = torch.float64
        self.register_buffer("pca_mean", torch.as_tensor(pca_mean, dtype=f64))  # (D,)
        self.register_buffer("pca_components", torch.as_tensor(pca_components, dtype=f64))  # (Nh, D)
        self.register_buffer("log_weights", torch.log(torch.as_tensor(weights, dtype=f64)))  # (K,)
        self.register_buffer("means", torch.as_tensor(means, dtype=f64))  # (K, Nh)
        prec_chol = torch.as_tensor(precisions_cholesky, dtype=f64)  # (K, Nh, Nh), precision = L L^T
        self.register_buffer("precisions_cholesky", prec_chol)
        # 1/2 log((2 pi)^Nh |Sigma_k|) = Nh/2 log(2 pi) - sum log diag(L_k), since |Sigma_k| = 1 / |L_k|^2.
        log_det_l = torch.log(torch.diagonal(prec_chol, dim1=1, dim2=2)).sum(1)
        self.register_buffer("log_normalizer", 0.5 * self.nh * math.log(2.0 * math.pi) - log_det_l)  # (K,)
        self.score_names = ["m", "nll", "d", "a"]
        self.default_score = "m"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N,C,P,P) -> PCA features (N, Nh) float64."""
        return (x.flatten(1).double() - self.pca_mean) @ self.pca_components.t()

    def mahalanobis_half(self, f: torch.Tensor) -> torch.Tensor:
        """(N, Nh) -> (N, K): 1/2 (f - mu_k)^T Sigma_k^-1 (f - mu_k) = 1/2 |L_k^T (f - mu_k)|^2."""
        # y[n, k, :] = (f_n - mu_k) @ L_k
        y = torch.einsum("nd,kde->nke", f, self.precisions_cholesky) - torch.einsum(
            "kd,kde->ke", self.means, self.precisions_cholesky).unsqueeze(0)
        return 0.5 * y.pow(2).sum(2)

    @torch.jit.export
    def scores(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        m_all = self.mahalanobis_half(self.features(x))  # (N, K)
        log_joint = self.log_weights - self.log_normalizer - m_all  # log w_k p(f|k)
        k = torch.argmax(log_joint, dim=1, keepdim=True)
        return {
            "m": m_all.gather(1, k).squeeze(1).float(),
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
        """(N, P, P): |x - PCA reconstruction| averaged over channels (the GMM itself has no pixel map)."""
        flat = x.flatten(1).double()
        recon = self.features(x) @ self.pca_components + self.pca_mean
        return (flat - recon).abs().view(x.shape[0], self.channels, self.patch_size, self.patch_size).mean(1).float()

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
    module = PCAGMM(pca.mean_, pca.components_, gmm.weights_, gmm.means_, gmm.precisions_cholesky_, c, p)
    info: Dict[str, Any] = {
        "em_iterations": int(gmm.n_iter_), "converged": bool(gmm.converged_),
        "mean_nll": float(-gmm.score(f)), "explained_variance": float(pca.explained_variance_ratio_.sum()),
    }
    return module, pca, gmm, info
