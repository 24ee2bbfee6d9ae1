"""A realistic FastAPI service built on `lifecycle` (see ``main.py``)."""
