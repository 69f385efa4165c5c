"""Patient-identifying DICOM attributes: which they are, and the one-way patient key.

:data:`PHI_KEYWORDS` lists the attributes of the DICOM PS3.15 Annex E *Basic Application
Level Confidentiality Profile* (Table E.1-1) that identify a patient, a person, a place,
a device or an encounter, plus the instance UIDs that link a file back to its study.
LungViT copies none of them into :class:`~lungvit.core.io.scan.ScanMetadata` unless the
caller asks (``include_phi=True``), and never logs them.

The patient identifier is kept only as :func:`patient_key`: HMAC-SHA-256 of the identifier
under a secret of this installation, truncated, so that training can split by patient
without holding the identifier. The secret (32 random bytes) is created on first use in
the data directory (``$LUNGVIT_HOME``, else ``$XDG_DATA_HOME/lungvit``, else
``~/.local/share/lungvit``; ``$LUNGVIT_PATIENT_KEY_FILE`` names another file, e.g. one
shared by the nodes of a cluster), readable by its owner only.

What the key protects: without the secret file, a key cannot be turned back into the
identifier, even by trying every identifier (a plain salted hash of a 7-digit ID reverses
in seconds), and keys of two installations cannot be linked. What it does not protect:
whoever can read the secret file (the user, an administrator, a backup) can test
candidate identifiers against a key; the same patient has the same key on one
installation, so keys link that patient's scans there. It keeps raw identifiers out of
logs, metadata and checkpoints; it is a pseudonym, not a de-identification method.
Deleting the secret changes every key (patient-level splits of earlier runs are kept in
their ``split.csv``, which holds no keys).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from lungvit.core.atomic import atomic_open

log = logging.getLogger(__name__)

# Domain separation of the keyed hash, versioned: bump it if the keying rule ever changes.
PATIENT_KEY_CONTEXT = b"lungvit/patient-key/v2\x00"
PATIENT_KEY_HEX_CHARS = 20  # 80 bits: no collisions in practice for any real archive
KEY_FILE_NAME = "patient-key.secret"
KEY_FILE_ENV = "LUNGVIT_PATIENT_KEY_FILE"
_SECRET_BYTES = 32
_secrets: dict[Path, bytes | None] = {}  # key file -> its secret (None: unusable; warned)
_secrets_lock = threading.Lock()

# PS3.15 Table E.1-1 (Basic Profile), the attributes that name or locate people, places,
# devices, visits and instances. Keywords as in PS3.6 (pydicom's dictionary).
PHI_KEYWORDS: tuple[str, ...] = (
    # the patient
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthName", "PatientMotherBirthName", "PatientSex", "PatientAge", "PatientSize",
    "PatientWeight", "PatientAddress", "PatientTelephoneNumbers", "PatientComments",
    "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
    "MedicalRecordLocator", "EthnicGroup", "Occupation", "MilitaryRank", "BranchOfService",
    "CountryOfResidence", "RegionOfResidence", "PatientReligiousPreference",
    "PatientInsurancePlanCodeSequence", "InsurancePlanIdentification", "MedicalAlerts",
    "Allergies", "AdditionalPatientHistory", "PregnancyStatus", "LastMenstrualDate",
    "SmokingStatus", "SpecialNeeds", "PatientState", "PatientTransportArrangements",
    "PatientInstitutionResidence", "ResponsiblePerson", "ResponsibleOrganization",
    "ReferencedPatientSequence", "ReferencedPatientAliasSequence",
    # people who saw, ordered, read or acquired it
    "ReferringPhysicianName", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
    "PerformingPhysicianName", "PerformingPhysicianIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "OperatorsName",
    "OperatorIdentificationSequence", "RequestingPhysician", "ScheduledPerformingPhysicianName",
    "OrderEnteredBy", "OrderEntererLocation", "OrderCallbackPhoneNumber",
    "ContentCreatorName", "ReviewerName", "VerifyingObserverName", "PersonName",
    "PersonAddress", "PersonTelephoneNumbers", "NamesOfIntendedRecipientsOfResults",
    # places and devices
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "InstitutionCodeSequence", "StationName", "DeviceSerialNumber", "DeviceUID",
    "DetectorID", "GantryID", "GeneratorID", "PlateID", "CassetteID",
    "PerformedStationName", "PerformedStationAETitle", "PerformedLocation",
    "ScheduledStationName", "ScheduledStationAETitle", "ScheduledStudyLocation",
    "ScheduledProcedureStepLocation", "CurrentPatientLocation", "RequestedProcedureLocation",
    # the visit, the order and the study
    "AccessionNumber", "StudyID", "AdmissionID", "IssuerOfAdmissionID", "ServiceEpisodeID",
    "RequestedProcedureID", "PerformedProcedureStepID", "ScheduledProcedureStepID",
    "StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "AcquisitionDate",
    "AcquisitionTime", "AcquisitionDateTime", "ContentDate", "ContentTime",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "AdmittingDate", "AdmittingTime", "StudyDescription", "SeriesDescription",
    "RequestedProcedureDescription", "PerformedProcedureStepDescription",
    "ReasonForTheRequestedProcedure", "ReasonForStudy", "AdmittingDiagnosesDescription",
    "ImageComments", "StudyComments", "RequestedProcedureComments",
    "ImagingServiceRequestComments", "InterpretationText", "TextString",
    "DerivationDescription", "ProtocolName", "AcquisitionComments",
    # UIDs that link the file back to its study and its device
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "MediaStorageSOPInstanceUID", "FrameOfReferenceUID", "SynchronizationFrameOfReferenceUID",
    "InstanceCreatorUID", "IrradiationEventUID", "StorageMediaFileSetUID",
    "ReferencedSOPInstanceUID", "TransactionUID",
    # free-form containers that often carry any of the above
    "RequestAttributesSequence", "SourceImageSequence", "ReferencedStudySequence",
    "ContentSequence", "OriginalAttributesSequence", "ModifiedAttributesSequence",
    "DigitalSignaturesSequence", "DataSetTrailingPadding",
)


def data_dir() -> Path:
    """LungViT's data directory (the rule of :func:`lungvit.training.store.default_data_dir`,
    which core may not import): ``$LUNGVIT_HOME``, ``$XDG_DATA_HOME/lungvit`` or
    ``~/.local/share/lungvit``. Not created here."""
    home = os.environ.get("LUNGVIT_HOME")
    if home:
        return Path(home).expanduser().absolute()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "lungvit"


def key_file() -> Path:
    """The file holding this installation's patient-key secret."""
    named = os.environ.get(KEY_FILE_ENV)
    return Path(named).expanduser().absolute() if named else data_dir() / KEY_FILE_NAME


def _read_or_create(path: Path) -> bytes:
    """The secret in ``path``, created (mode 600, atomically) when there is none.

    Raises:
        OSError: it cannot be read or created.
        ValueError: the file does not hold a secret.
    """
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Linked into place, never replacing a secret another process just made (mode 600).
        with atomic_open(path, "w", encoding="ascii", fsync=True, overwrite=False) as f:
            f.write(secrets.token_hex(_SECRET_BYTES) + "\n")
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    text = path.read_text(encoding="ascii").strip()
    secret = bytes.fromhex(text)
    if len(secret) < 16:
        raise ValueError("too short")
    return secret


def installation_secret() -> bytes | None:
    """This installation's patient-key secret (see the module docstring), created on
    first use; None (with one logged warning) when it can be neither read nor created."""
    path = key_file()
    with _secrets_lock:
        if path not in _secrets:
            try:
                _secrets[path] = _read_or_create(path)
            except (OSError, ValueError) as exc:
                log.warning("patient keys are off: the secret file %s cannot be used (%s); "
                            "data splits fall back to one group per file", path,
                            getattr(exc, "strerror", None) or type(exc).__name__)
                _secrets[path] = None
        return _secrets[path]


def patient_key(patient_id: str | None) -> str | None:
    """One-way key of a patient identifier, for patient-level data splits.

    Args:
        patient_id: the DICOM PatientID (surrounding spaces and NULs are ignored).

    Returns:
        ``PATIENT_KEY_HEX_CHARS`` hex characters of HMAC-SHA-256 under this installation's
        secret, or None when the identifier is missing or blank (or no secret is usable).
    """
    if patient_id is None:
        return None
    ident = str(patient_id).strip(" \x00")
    if not ident:
        return None
    secret = installation_secret()
    if secret is None:
        return None
    digest = hmac.new(secret, PATIENT_KEY_CONTEXT + ident.encode("utf-8", "surrogatepass"),
                      hashlib.sha256)
    return digest.hexdigest()[:PATIENT_KEY_HEX_CHARS]


def extract_phi(ds: Any) -> dict[str, str]:
    """The identifying attributes present in a pydicom Dataset, as display strings.

    Only called when the caller explicitly asked for PHI. Sequences are summarised by
    their item count; their contents are not copied.
    """
    out: dict[str, str] = {}
    file_meta = getattr(ds, "file_meta", None)
    for keyword in PHI_KEYWORDS:
        source = file_meta if keyword.startswith("MediaStorage") else ds
        if source is None or keyword not in source:
            continue
        try:
            elem = source.data_element(keyword)
            value = elem.value
        except Exception:  # a malformed value: show its raw text rather than fail
            elem, value = None, source.get_item(keyword).value
        if value is None or value == "":
            continue
        if elem is not None and elem.VR == "SQ":
            out[keyword] = f"<sequence of {len(value)} item(s)>"
        elif isinstance(value, (bytes, bytearray)):
            out[keyword] = (value.decode("latin-1").strip(" \x00") if elem is None
                            else f"<{len(value)} bytes>")
        else:
            out[keyword] = str(value)
    return out
