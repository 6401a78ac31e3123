"""A second implementation of the MCSpatNet detection protocol (SPEC 1.4), written the way their
evaluation code works (dot maps, ``numpy.where`` raster order, nearest unmatched prediction within
the radius), independent of `cellulib.metrics.agreement`: the tests score with both and compare."""
from __future__ import annotations

import numpy as np


def reference_counts(truth_xy, pred_xy, radius, shape=(600, 600)):
    """A second implementation of the protocol, on dot maps like MCSpatNet's ``calc``."""
    g_dot = np.zeros(shape, dtype=np.uint8)
    e_dot = np.zeros(shape, dtype=np.uint8)
    for x, y in np.asarray(truth_xy, dtype=float).reshape(-1, 2):
        g_dot[int(np.floor(y + 0.5)), int(np.floor(x + 0.5))] = 1
    for x, y in np.asarray(pred_xy, dtype=float).reshape(-1, 2):
        e_dot[int(np.floor(y + 0.5)), int(np.floor(x + 0.5))] = 1
    ey, ex = np.where(e_dot > 0)
    processing = e_dot.copy()
    tp = 0
    for gy, gx in zip(*np.where(g_dot > 0)):
        dist = np.sqrt((ey - gy) ** 2.0 + (ex - gx) ** 2.0)
        for j in np.argsort(dist, kind="stable"):  # nearest first; ties: first in raster order
            if dist[j] >= radius:
                break
            if processing[ey[j], ex[j]]:
                processing[ey[j], ex[j]] = 0
                tp += 1
                break
    fn = int((g_dot > 0).sum()) - tp
    return tp, int(processing.sum()), fn
