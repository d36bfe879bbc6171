"""Token stores: preparation (prepare.py), the store format (store.py) and the batch loader (loader.py);
see docs/data.md."""
