"""Run history: one serializer, the recorder that writes session folders, the store and its SQLite index."""
