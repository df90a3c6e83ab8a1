"""`make bench`: the service measured against ceilings taken in the same run (see
server.bench.run), seeded with a generated graph (server.bench.graph) through the bulk
importer."""
