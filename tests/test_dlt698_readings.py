"""Catalogue readings of GET responses: one reading per element of an attribute read whole, the
element's own OAD and scaling, feature bits kept, unknown OADs shown raw, DARs only in failures."""

from __future__ import annotations

from meter_gateway.protocols.dlt698 import requests as rq
from meter_gateway.protocols.dlt698.apdu import GetResponseNormalList, Piid, ResultNormal, parse_apdu
from meter_gateway.protocols.dlt698.axdr import OAD, Data, DataType, Ints, array
from meter_gateway.protocols.dlt698.catalogue import default_catalogue

ENERGY = OAD(0x0010, 0x02, 0)


def _energy(*values: int) -> Data:
    return array(*(Data(DataType.DOUBLE_LONG_UNSIGNED, v) for v in values))


def test_array_longer_than_the_usual_tariffs_gives_every_element() -> None:
    values = tuple(range(100, 100 + 20 * 7, 7))  # total + 19 tariffs
    readings = default_catalogue().readings(ENERGY, _energy(*values))
    assert [r.oad for r in readings] == [OAD(0x0010, 0x02, i) for i in range(1, 21)]
    assert [r.raw for r in readings] == list(values)
    assert readings[-1].quantity == "energy.active.import.t19"
    assert readings[-1].value == values[-1] / 100
    assert readings[-1].unit == "kWh"


def test_one_element_asked_for_directly_is_one_reading() -> None:
    (reading,) = default_catalogue().readings(OAD(0x2000, 0x02, 2), Data(DataType.LONG_UNSIGNED, 2304))
    assert (reading.oad, reading.quantity, reading.value, reading.unit) == (OAD(0x2000, 2, 2), "voltage.l2", 230.4, "V")


def test_feature_bits_are_kept_in_the_element_oads() -> None:
    with_feature = OAD(0x0010, 0x22, 0)
    readings = default_catalogue().readings(with_feature, _energy(5, 2, 3))
    assert [r.oad for r in readings] == [OAD(0x0010, 0x22, i) for i in (1, 2, 3)]
    assert [r.quantity for r in readings] == [
        "energy.active.import.total",
        "energy.active.import.t1",
        "energy.active.import.t2",
    ]


def test_unknown_oad_is_one_raw_reading() -> None:
    unknown = OAD(0xEEEE, 0x02, 0)
    (reading,) = default_catalogue().readings(unknown, array(Data(DataType.UNSIGNED, 1), Data(DataType.UNSIGNED, 2)))
    assert (reading.oad, reading.raw, reading.value, reading.quantity, reading.name) == (
        unknown,
        [1, 2],
        [1, 2],
        None,
        "EEEE0200",
    )


def test_readings_of_a_response_skip_dars_and_repeat_identically() -> None:
    voltages = OAD(0x2000, 0x02, 0)
    response = GetResponseNormalList(
        piid=Piid(3),
        results=(
            ResultNormal(ENERGY, _energy(1010317, 71510)),
            ResultNormal(OAD(0x2001, 0x02, 0), dar=6),
            ResultNormal(voltages, array(*(Data(DataType.LONG_UNSIGNED, v) for v in (2303, 2298, 2297)))),
        ),
    )
    apdu = parse_apdu(response.encode())
    first = rq.readings(apdu)
    assert [(r.quantity, r.value) for r in first] == [
        ("energy.active.import.total", 10103.17),
        ("energy.active.import.t1", 715.1),
        ("voltage.l1", 230.3),
        ("voltage.l2", 229.8),
        ("voltage.l3", 229.7),
    ]
    assert rq.failures(apdu) == [(OAD(0x2001, 0x02, 0), 6)]
    assert rq.readings(parse_apdu(response.encode())) == first  # the converters built once give the same


def test_decoded_oads_equal_built_ones() -> None:
    response = GetResponseNormalList(piid=Piid(1), results=(ResultNormal(ENERGY, _energy(1)),))
    first = parse_apdu(response.encode())
    again = parse_apdu(response.encode())
    assert isinstance(first, GetResponseNormalList)
    assert isinstance(again, GetResponseNormalList)
    assert first.results[0].oad == ENERGY == again.results[0].oad
    assert first == again == response


def test_an_integer_array_gives_the_readings_of_its_data() -> None:
    """An Ints (what the decoder gives for an array of integers) reads as the tuple of its Data,
    longer than the precomputed elements too."""
    catalogue = default_catalogue()
    for count in (5, 20):
        values = tuple(range(100, 100 + 7 * count, 7))
        ints = Data(DataType.ARRAY, Ints(DataType.DOUBLE_LONG_UNSIGNED, values))
        assert catalogue.readings(ENERGY, ints) == catalogue.readings(ENERGY, _energy(*values))
    voltages = OAD(0x2000, 0x02, 0)  # scaler -1, long-unsigned
    ints = Data(DataType.ARRAY, Ints(DataType.LONG_UNSIGNED, (2303, 2298, 2297)))
    assert [r.value for r in catalogue.readings(voltages, ints)] == [230.3, 229.8, 229.7]
    whole = catalogue.readings(OAD(0x2000, 0x02, 1), ints)  # not spread: one reading of the array
    assert [r.raw for r in whole] == [[2303, 2298, 2297]]
