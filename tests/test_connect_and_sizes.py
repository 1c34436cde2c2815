"""What SillyTavern and Open WebUI send that A1111 and OpenAI answer (issue 21): Forge's module list on Connect,
and sizes that are not multiples of 8, drawn rounded down as A1111 draws them."""


def test_sillytaverns_connect_gets_forges_empty_module_list_and_logs_no_warning(client, caplog):
    with caplog.at_level("INFO", logger="imagine"):
        response = client.get("/sdapi/v1/sd-modules")
    assert response.status_code == 200
    assert response.get_json() == []
    assert [record.levelname for record in caplog.records] == ["INFO"]
