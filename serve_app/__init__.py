"""HTTP question answering on Ray Serve: a FastAPI ingress, a batched model that scales to zero, a web page.

Run it with ``python -m serve_app --model DIR`` or ``serve run serve_app/config.yaml``; see ``app.py``.
"""
