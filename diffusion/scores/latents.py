"""How well an autoencoder's latent space separates the classes, as figures and a picture.

- silhouette (Rousseeuw 1987; in [-1, 1], higher: classes are tight and apart) and
  Calinski-Harabasz (between- over within-class dispersion, scaled; higher is better) of the
  latents themselves, with the true classes as clusters (scikit-learn);
- a picture of the latents in 2-D, coloured by class: PCA (linear; its explained variance) beside
  t-SNE (van der Maaten & Hinton 2008; neighbourhoods), written as a PNG.
"""

import io
from pathlib import Path

import numpy as np
from torch import Tensor

from diffusion.records import atomic_write

LATENT_SPACE = "latent_space.png"


def latent_space_report(latents: Tensor, labels: Tensor, out: Path, seed: int = 0) -> dict:
    """latents (N, D), labels (N,) ints: the scores, and the picture written to `out` (atomically)."""
    # scikit-learn and matplotlib take seconds to import; only a run that pictures latents needs them.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.metrics import calinski_harabasz_score, silhouette_score

    points = latents.double().numpy()
    classes = labels.numpy()
    # Both scores need 2 <= clusters <= points - 1; otherwise they are not defined (None).
    defined = 2 <= len(np.unique(classes)) < len(points)
    scores = {
        "num_points": len(points),
        "latent_dim": points.shape[1],
        "silhouette": float(silhouette_score(points, classes)) if defined else None,
        "calinski_harabasz": float(calinski_harabasz_score(points, classes)) if defined else None,
    }
    pca = PCA(n_components=min(2, *points.shape), random_state=seed)
    projected = {"PCA": pca.fit_transform(points)}
    if projected["PCA"].shape[1] == 1:  # one latent dimension: its values against zero
        projected["PCA"] = np.concatenate([projected["PCA"], np.zeros_like(projected["PCA"])], axis=1)
    scores["pca_explained_variance"] = float(pca.explained_variance_ratio_.sum())
    if points.shape[1] > 2 and len(points) > 4:
        perplexity = min(30.0, (len(points) - 1) / 3)
        projected["t-SNE"] = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            points
        )

    figure, axes = plt.subplots(1, len(projected), figsize=(5.5 * len(projected), 5), squeeze=False)
    for axis, (name, xy) in zip(axes[0], projected.items()):
        for label in np.unique(classes):
            chosen = classes == label
            axis.scatter(xy[chosen, 0], xy[chosen, 1], s=4, alpha=0.7, label=str(label), color=plt.cm.tab10(label % 10))
        title = name if name != "PCA" else f"PCA ({scores['pca_explained_variance']:.0%} of the variance)"
        axis.set_title(title)
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0][-1].legend(title="class", markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
    figure.suptitle(
        f"{len(points)} held-out images, {points.shape[1]}-d latents: silhouette {format_score(scores['silhouette'])}, "
        f"Calinski-Harabasz {format_score(scores['calinski_harabasz'], '.1f')}"
    )
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, png.getvalue())
    return scores


def format_score(value: float | None, spec: str = ".3f") -> str:
    return "undefined (needs 2 to N-1 classes among N points)" if value is None else format(value, spec)
