"""Retrieval methods (SPEC 3): kNN-LM (Khandelwal et al. 2020) and the continuous cache (Grave et al.
2017). Neither changes a weight: both mix the model's distribution with a distribution over tokens
read from what they retrieve (`mix.py`): a faiss datastore over the prepare split (`knn.py`) or the
recent positions of the stream (`cache.py`). The methods themselves are in `methods.py`.
"""
