"""The read API service: users' current lists, movies and their neighbours over HTTP."""
