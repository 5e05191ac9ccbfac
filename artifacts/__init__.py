"""The bundle contract: manifest schema, writing, loading and verification."""
