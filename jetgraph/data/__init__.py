"""Data files shipped with jetgraph (keyword lists)."""
