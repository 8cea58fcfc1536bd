"""The embedding map `foundry eval knn|linear` logs (``plots/embedding_tsne.png``): a 2-D t-SNE
(van der Maaten & Hinton 2008; scikit-learn) of test features, coloured by class. It is kept apart
from the training figures (pipeline/registry/plots.py), which every rank imports, since importing
scikit-learn and SciPy adds over half a second to a process's start."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from ssl_foundry.pipeline.registry.plots import figure_png  # noqa: E402


def embedding_map(features: torch.Tensor, labels: torch.Tensor, class_names: list[str] | None = None,
                  max_points: int = 2000, seed: int = 0, title: str = "") -> bytes:
    """t-SNE of (at most ``max_points``, a seeded random subset of) ``features``, coloured by label."""
    keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:max_points]
    x, y = features[keep].double().numpy(), labels[keep].numpy()
    perplexity = min(30.0, (len(x) - 1) / 3)  # t-SNE needs perplexity < points
    points = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10" if y.max() < 10 else "tab20")
    for label in sorted(set(y.tolist())):
        mask = y == label
        name = class_names[label] if class_names and label < len(class_names) else str(label)
        axis.scatter(points[mask, 0], points[mask, 1], s=4, color=cmap(label % cmap.N), label=name)
    axis.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(title or f"t-SNE of {len(x)} test features")
    return figure_png(figure)
