"""Builders for what a gateway (the DL/T 698.45 client) sends, and the response readers it needs.

Each builder returns a :class:`~meter_gateway.protocols.dlt698.frame.Frame`; call ``.encode()``
for the bytes (``preamble=4`` on RS-485). Times and random numbers are parameters: nothing here
reads a clock or draws random bytes.

Remote control (DL/T 698.45-2017 Appendix E.8 control objects, class 8 methods): 8000 遥控
method 129 trips (跳闸) with ``array of structure {relay OAD, alarm delay unsigned (min),
power-off time long-unsigned (min, 0 = until closed), auto-close bool}``, method 130 closes
(合闸) with ``array of structure {relay OAD, command enum (0 allow closing, 1 close now)}``;
8001 保电 method 127 enables keep-power, 128 disables it (parameter null). The relay output unit
is F2050201 (继电器输出 unit 1). 4000 method 127 is the broadcast time set (广播校时,
parameter date_time_s; vectors P61/P62).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Sequence
from typing import Any, Final

from meter_gateway.protocols.dlt698.apdu import (
    NULL_SECURITY,
    ActionRequest,
    Apdu,
    ConnectMechanism,
    ConnectRequest,
    GetRecord,
    GetRequestNormal,
    GetRequestNormalList,
    GetRequestRecord,
    GetResponseNormal,
    GetResponseNormalList,
    LinkRequest,
    LinkResponse,
    Piid,
    ReportNotificationList,
    ReportNotificationRecordList,
    ReportResponseList,
    ReportResponseRecordList,
    ResultNormal,
    ResultRecord,
    SecurityRequest,
    SecurityResponse,
    SetRequestNormal,
    TimeTag,
    Verification,
)
from meter_gateway.protocols.dlt698.axdr import (
    CSD,
    NULL,
    OAD,
    OMD,
    RCSD,
    RSD,
    TI,
    Data,
    DataType,
    DateTime,
    DateTimeS,
    Selector1,
    Selector2,
    array,
    structure,
)
from meter_gateway.protocols.dlt698.catalogue import Catalogue, Reading, default_catalogue
from meter_gateway.protocols.dlt698.errors import LocalProtocolError
from meter_gateway.protocols.dlt698.frame import FUNCTION_DATA, FUNCTION_LINK, Control, Frame, ServerAddress

RELAY_1: Final = OAD(0xF205, 0x02, 0x01)
FREEZE_TIME: Final = OAD(0x2021, 0x02, 0x00)
REQUEST: Final = Control(FUNCTION_DATA, from_server=False, prm=True)
REPORT_ANSWER: Final = Control(FUNCTION_DATA, from_server=False, prm=False)
LINK_ANSWER: Final = Control(FUNCTION_LINK, from_server=False, prm=False)


def request_frame(address: ServerAddress, apdu: Apdu | bytes, client: int = 0, *, scrambled: bool = False) -> Frame:
    """A client request frame (DIR 0, PRM 1, user data) carrying ``apdu``."""
    data = apdu if isinstance(apdu, bytes) else apdu.encode()
    control = REQUEST if not scrambled else Control(FUNCTION_DATA, False, True, scrambled=True)
    return Frame(control, address, client, data)


def get(
    address: ServerAddress, oads: Sequence[OAD], *, piid: int = 1, client: int = 0, timetag: TimeTag | None = None
) -> Frame:
    """GET-Request: Normal for one OAD, NormalList for several."""
    if not oads:
        raise LocalProtocolError("GET needs at least one OAD")
    p = Piid(piid)
    apdu: Apdu
    if len(oads) == 1:
        apdu = GetRequestNormal(piid=p, oad=oads[0], timetag=timetag)
    else:
        apdu = GetRequestNormalList(piid=p, oads=tuple(oads), timetag=timetag)
    return request_frame(address, apdu, client)


def get_record(
    address: ServerAddress, oad: OAD, rsd: RSD, columns: Sequence[CSD], *, piid: int = 1, client: int = 0
) -> Frame:
    """GET-Request Record: rows of record object ``oad`` chosen by ``rsd``, columns ``columns``."""
    return request_frame(
        address, GetRequestRecord(piid=Piid(piid), record=GetRecord(oad, rsd, RCSD(tuple(columns)))), client
    )


def freeze_at(when: datetime.datetime) -> RSD:
    """Selector 1 on the freeze time 2021: the record frozen at ``when`` (a daily freeze: midnight)."""
    return RSD(1, Selector1(FREEZE_TIME, Data(DataType.DATE_TIME_S, DateTimeS.from_datetime(when))))


def freezes_between(start: datetime.datetime, end: datetime.datetime, interval: TI | None = None) -> RSD:
    """Selector 2 on the freeze time 2021: records frozen in [start, end), every ``interval``."""
    step = NULL if interval is None else Data(DataType.TI, interval)
    return RSD(
        2,
        Selector2(
            FREEZE_TIME,
            Data(DataType.DATE_TIME_S, DateTimeS.from_datetime(start)),
            Data(DataType.DATE_TIME_S, DateTimeS.from_datetime(end)),
            step,
        ),
    )


def set_value(address: ServerAddress, oad: OAD, data: Data, *, piid: int = 1, client: int = 0) -> Frame:
    """SET-Request Normal."""
    return request_frame(address, SetRequestNormal(piid=Piid(piid), oad=oad, data=data), client)


def set_clock(address: ServerAddress, when: datetime.datetime, *, piid: int = 1, client: int = 0) -> Frame:
    """SET 40000200 (date-time) to ``when`` (the meter's local time)."""
    return set_value(
        address, OAD(0x4000, 2, 0), Data(DataType.DATE_TIME_S, DateTimeS.from_datetime(when)), piid=piid, client=client
    )


def action(address: ServerAddress, omd: OMD, data: Data = NULL, *, piid: int = 1, client: int = 0) -> Frame:
    """ACTION-Request (Normal)."""
    return request_frame(address, ActionRequest(piid=Piid(piid), omd=omd, data=data), client)


def broadcast_time(when: datetime.datetime, *, piid: int = 1, client: int = 0) -> Frame:
    """Broadcast ACTION 4000 method 127 (广播校时) with ``when``; meters do not answer."""
    return action(
        ServerAddress.broadcast(),
        OMD(0x4000, 127),
        Data(DataType.DATE_TIME_S, DateTimeS.from_datetime(when)),
        piid=piid,
        client=client,
    )


def relay_trip(
    address: ServerAddress,
    *,
    relay: OAD = RELAY_1,
    alarm_delay: int = 0,
    power_off_minutes: int = 0,
    auto_close: bool = False,
    piid: int = 1,
    client: int = 0,
) -> Frame:
    """ACTION 8000 method 129 (跳闸). Usually wrapped in SECURITY with the master's MAC."""
    parameter = array(
        structure(
            Data(DataType.OAD, relay),
            Data(DataType.UNSIGNED, alarm_delay),
            Data(DataType.LONG_UNSIGNED, power_off_minutes),
            Data(DataType.BOOL, auto_close),
        )
    )
    return action(address, OMD(0x8000, 129), parameter, piid=piid, client=client)


def relay_close(
    address: ServerAddress, *, relay: OAD = RELAY_1, close_now: bool = False, piid: int = 1, client: int = 0
) -> Frame:
    """ACTION 8000 method 130 (合闸): allow closing (the customer presses the button) or close now."""
    parameter = array(structure(Data(DataType.OAD, relay), Data(DataType.ENUM, 1 if close_now else 0)))
    return action(address, OMD(0x8000, 130), parameter, piid=piid, client=client)


def keep_power(address: ServerAddress, enable: bool, *, piid: int = 1, client: int = 0) -> Frame:
    """ACTION 8001 method 127 (保电投入) or 128 (保电解除)."""
    return action(address, OMD(0x8001, 127 if enable else 128), NULL, piid=piid, client=client)


def secured(request: Frame, rn: bytes) -> Frame:
    """Wrap a request frame's APDU in SECURITY-Request, plaintext + RN (the meter answers with a
    MAC over its response). ``rn`` is the caller's random number (16 bytes is usual)."""
    if not rn:
        raise LocalProtocolError("SECURITY-Request plaintext+RN needs a random number")
    wrapped = SecurityRequest(data=request.apdu, verification=Verification(1, rn=rn))
    return Frame(request.control, request.address, request.client, wrapped.encode())


def connect(
    address: ServerAddress,
    *,
    piid: int = 0,
    client: int = 0,
    timeout: int = 7200,
    apdu_max: int = 1024,
    mechanism: ConnectMechanism = NULL_SECURITY,
    version: int | None = None,
) -> Frame:
    """CONNECT-Request (public association, NullSecurity, all conformance bits by default);
    ``version``: the protocol version to offer (None: :class:`ConnectRequest`'s)."""
    request = ConnectRequest(
        piid=Piid(piid),
        timeout=timeout,
        apdu_max=apdu_max,
        send_max=apdu_max,
        receive_max=apdu_max,
        mechanism=mechanism,
    )
    if version is not None:
        request = dataclasses.replace(request, version=version)
    return request_frame(address, request, client)


def link_response(
    request: Frame,
    login: LinkRequest,
    received: datetime.datetime,
    now: datetime.datetime,
    *,
    result: int = 0,
    clock_trusted: bool = True,
) -> Frame:
    """The master's answer to a terminal's LINK-Request (login / heartbeat / logout).

    ``received`` is when the request arrived, ``now`` the response time (both passed in)."""
    apdu = LinkResponse(
        piid=Piid(login.piid.seq, login.piid.high_priority),
        result=result,
        clock_trusted=clock_trusted,
        request_time=login.time,
        receive_time=DateTime.from_datetime(received),
        response_time=DateTime.from_datetime(now),
    )
    return Frame(LINK_ANSWER, request.address, request.client, apdu.encode())


def report_response(report: Frame, notification: ReportNotificationList | ReportNotificationRecordList) -> Frame:
    """Our acknowledgement of a meter's REPORT-Notification (DIR 0, PRM 0)."""
    oads = tuple(result.oad for result in notification.results)
    piid = Piid(notification.piid.seq, notification.piid.high_priority)
    apdu: Apdu
    if isinstance(notification, ReportNotificationRecordList):
        apdu = ReportResponseRecordList(piid=piid, oads=oads)
    else:
        apdu = ReportResponseList(piid=piid, oads=oads)
    return Frame(REPORT_ANSWER, report.address, report.client, apdu.encode())


def unwrap(apdu: Apdu) -> Apdu:
    """The plaintext APDU inside a SECURITY-Request/Response (the APDU itself otherwise)."""
    if isinstance(apdu, SecurityRequest | SecurityResponse):
        if apdu.inner is None:
            raise LocalProtocolError("ciphertext SECURITY APDU: decrypt it first (ESAM)")
        return apdu.inner
    return apdu


# The APDUs whose A-ResultNormal results carry values, and where their results are.
_RESULTS: Final[dict[type[Apdu], Callable[[Any], tuple[ResultNormal, ...]]]] = {
    GetResponseNormal: lambda apdu: (apdu.result,),
    GetResponseNormalList: lambda apdu: apdu.results,
    ReportNotificationList: lambda apdu: apdu.results,
}


def results(apdu: Apdu) -> tuple[ResultNormal, ...]:
    """The A-ResultNormal results of a GET-Response Normal / NormalList or a REPORT-Notification
    List (SECURITY-wrapped plaintext too); none for any other APDU."""
    where = _RESULTS.get(type(apdu))
    if where is None:
        if not isinstance(apdu, SecurityRequest | SecurityResponse):
            return ()
        apdu = unwrap(apdu)
        where = _RESULTS.get(type(apdu))
    return where(apdu) if where is not None else ()


def readings(apdu: Apdu, catalogue: Catalogue | None = None) -> list[Reading]:
    """(OAD, raw, scaled value, unit, quantity) of every value in a GET-Response Normal /
    NormalList or a REPORT-Notification List (SECURITY-wrapped plaintext too). A result that is a
    DAR gives no reading: see :func:`failures`."""
    return (catalogue or default_catalogue()).result_readings(results(apdu))


def failures(apdu: Apdu) -> list[tuple[OAD, int]]:
    """(OAD, DAR) of every result that is a DAR instead of data."""
    return [(r.oad, r.dar) for r in results(apdu) if r.dar is not None]


def record_readings(result: ResultRecord, catalogue: Catalogue | None = None) -> list[list[Reading]]:
    """Per row, the readings of a GET-Record result (e.g. daily freeze rows)."""
    return (catalogue or default_catalogue()).record_readings(result)
