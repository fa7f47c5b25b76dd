"""PaddleSlim's PieceWiseSearch for slimquant: the `piecewise` smoothing plugin."""

from slimquant_piecewise.plugin import PieceWiseConfig, PieceWiseSearchPlugin, kmeans_1d

__all__ = ["PieceWiseConfig", "PieceWiseSearchPlugin", "kmeans_1d"]
