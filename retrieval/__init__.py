"""Knowledge retrieval (FAISS index, passage store, kNN datastore): arrives with the retrieval issue."""
