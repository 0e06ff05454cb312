"""The Azurite fixture itself answers on Blob and Table (the integration tests rely on it)."""

import pytest

pytestmark = pytest.mark.integration


def test_blob_and_table_round_trip(azurite):
    from azure.data.tables import TableServiceClient
    from azure.storage.blob import BlobServiceClient

    blobs = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = blobs.create_container("fixture-check")
    container.upload_blob("hello.txt", b"hi")
    assert container.download_blob("hello.txt").readall() == b"hi"
    tables = TableServiceClient.from_connection_string(azurite.connection_string)
    table = tables.create_table("fixturecheck")
    table.upsert_entity({"PartitionKey": "p", "RowKey": "r", "value": 3})
    assert table.get_entity("p", "r")["value"] == 3
