"""Static HTML results browser (``report/index.html`` beside eval.py's / search.py's outputs).

It sits above ``dalg.retrieval`` and ``dalg.data``: it reads evaluation results (per-set rankings, ground
truth, scores) and image files, writes thumbnails and one self-contained page (inline CSS/JS, no server, no
CDN). The model enters only through an attention-map callable the caller passes in.
"""
