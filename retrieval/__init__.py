"""Knowledge retrieval: passages, their embeddings and a FAISS index that grows at runtime (docs/knowledge.md)."""
