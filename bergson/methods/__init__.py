"""Attribution methods composed from the collection loop, transforms, stores and search."""
