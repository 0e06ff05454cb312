// DLP alert enrichment pipeline: everything `azd up` provisions, in one resource group.
//
//   Defender XDR Streaming API ──► Event Hub (namespace, hub, consumer group)
//                                      │  Event Hubs Data Receiver (on the hub only)
//                                      ▼
//   Function app (Flex Consumption, Python) ── user-assigned managed identity
//        │ Storage Blob + Table Data Contributor (on the storage account: host, checkpoints, state)
//        │ Monitoring Metrics Publisher (on the data collection rule only: Logs Ingestion API)
//        ▼
//   Data collection endpoint + rule ──► Log Analytics custom table DLPEnrichedAlerts_CL (Sentinel)
//   Application Insights (logs and OpenTelemetry metrics of the app)
targetScope = 'subscription'

@minLength(1)
@maxLength(40)
@description('azd environment name: prefixes the resource group and seeds resource names.')
param environmentName string

@minLength(1)
@description('Region of every resource (one that offers Flex Consumption).')
param location string

@description('Event Hub the Defender XDR Streaming API writes to.')
param eventHubName string = 'defender-alerts'

@description('Consumer group the function app reads with (never $Default, which other readers may share).')
param consumerGroupName string = 'dlp-pipeline'

@description('Event Hub partitions (fixed after creation on the Standard tier).')
@minValue(1)
@maxValue(32)
param partitionCount int = 4

@description('Turn Microsoft Sentinel on for the workspace (skip when the workspace is already Sentinel-enabled elsewhere).')
param enableSentinel bool = true

@description('Let the app write back to Sentinel incidents (the sentinel_incident sink): grants Microsoft Sentinel Responder on the workspace. Needs enableSentinel.')
param enableIncidentWriteback bool = false

@description('Maximum instances of the Flex Consumption app.')
param maximumInstanceCount int = 40

@description('Pipeline config file, relative to the app root (see pipeline/samples/pipeline.toml).')
param pipelineConfig string = 'deploy/function.toml'

param tags object = {}

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var allTags = union(tags, { 'azd-env-name': environmentName })

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: allTags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-dlp-${resourceToken}'
    location: location
    tags: allTags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    location: location
    tags: allTags
    resourceToken: resourceToken
    principalId: identity.outputs.principalId
    enableSentinel: enableSentinel
    enableIncidentWriteback: enableIncidentWriteback
  }
}

module eventHub 'modules/eventhub.bicep' = {
  name: 'eventhub'
  scope: rg
  params: {
    location: location
    tags: allTags
    namespaceName: 'evhns-dlp-${resourceToken}'
    eventHubName: eventHubName
    consumerGroupName: consumerGroupName
    partitionCount: partitionCount
    principalId: identity.outputs.principalId
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    location: location
    tags: allTags
    name: 'stdlp${resourceToken}'
    principalId: identity.outputs.principalId
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  params: {
    location: location
    tags: allTags
    name: 'func-dlp-${resourceToken}'
    planName: 'plan-dlp-${resourceToken}'
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    appInsightsConnectionString: monitoring.outputs.appInsightsConnectionString
    eventHubNamespaceFqdn: eventHub.outputs.namespaceFqdn
    eventHubName: eventHubName
    consumerGroupName: consumerGroupName
    maximumInstanceCount: maximumInstanceCount
    pipelineConfig: pipelineConfig
    logsIngestionEndpoint: monitoring.outputs.logsIngestionEndpoint
    dcrImmutableId: monitoring.outputs.dcrImmutableId
    dcrStreamName: monitoring.outputs.streamName
  }
}

// azd writes these into the environment (.azure/<env>/.env); docs/deploy.md uses them.
output AZURE_LOCATION string = location
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output EVENT_HUB_NAMESPACE_RESOURCE_ID string = eventHub.outputs.namespaceId
output EVENT_HUB_NAME string = eventHubName
output EVENT_HUB_CONSUMER_GROUP string = consumerGroupName
output MANAGED_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output LOG_ANALYTICS_WORKSPACE_ID string = monitoring.outputs.workspaceId
output DCE_LOGS_INGESTION_ENDPOINT string = monitoring.outputs.logsIngestionEndpoint
output DCR_IMMUTABLE_ID string = monitoring.outputs.dcrImmutableId
output DCR_STREAM_NAME string = monitoring.outputs.streamName
output SENTINEL_TABLE string = monitoring.outputs.tableName
