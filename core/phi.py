"""Patient-identifying DICOM attributes: which they are, and the one-way patient key.

:data:`PHI_KEYWORDS` lists the attributes of the DICOM PS3.15 Annex E *Basic Application
Level Confidentiality Profile* (Table E.1-1) that identify a patient, a person, a place,
a device or an encounter, plus the instance UIDs that link a file back to its study.
LungViT copies none of them into :class:`~lungvit.core.scan.ScanMetadata` unless the
caller asks (``include_phi=True``), and never logs them.

The patient identifier is kept only as :func:`patient_key`: a salted SHA-256, truncated,
so that training can split by patient without holding the identifier. The salt is fixed
and public (it is in this file), which makes the key *pseudonymous*, not anonymous:
whoever has a list of candidate identifiers can hash them and compare. It keeps raw
identifiers out of logs, metadata and checkpoints; it is not a de-identification method.
"""
from __future__ import annotations

import hashlib
from typing import Any

# Fixed and versioned: changing it changes every key, which breaks patient-level splits
# recorded with the old one. Bump the version suffix if the keying rule ever changes.
PATIENT_KEY_SALT = b"lungvit/patient-key/v1\x00"
PATIENT_KEY_HEX_CHARS = 20  # 80 bits: no collisions in practice for any real archive

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


def patient_key(patient_id: str | None) -> str | None:
    """One-way key of a patient identifier, for patient-level data splits.

    Args:
        patient_id: the DICOM PatientID (surrounding spaces and NULs are ignored).

    Returns:
        ``PATIENT_KEY_HEX_CHARS`` hex characters of SHA-256(salt + id), or None when the
        identifier is missing or blank.
    """
    if patient_id is None:
        return None
    ident = str(patient_id).strip(" \x00")
    if not ident:
        return None
    digest = hashlib.sha256(PATIENT_KEY_SALT + ident.encode("utf-8", "surrogatepass"))
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
